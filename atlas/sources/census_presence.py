"""Which genes each dataset of a CELLxGENE Census experiment measured: its ``feature_dataset_presence_matrix``.

The Census stores every dataset's cells against one gene table (var), so a gene a dataset never measured reads as
zero counts there; the measurement's ``feature_dataset_presence_matrix`` (a sparse array, one row per dataset: the
``soma_joinid`` of the Census' ``census_info/datasets`` table, one column per var ``soma_joinid``) says which genes
each dataset did measure. Its rows are named only by that table, which lies beside the experiment in the Census
(``<census>/census_data/<organism>`` and ``<census>/census_info/datasets``): it is read when the experiment is one of
that Census' members, and every value read from it is checked.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from scatlas.atlas.errors import InputError
from scatlas.atlas.sources.soma_uris import member_inside
from scatlas.atlas.validate import escaped_list

logger = logging.getLogger(__name__)

PRESENCE_MATRIX = "feature_dataset_presence_matrix"
"""The member of the measurement (``ms/RNA``) that holds which genes each dataset measured."""


def _plain(uri: str) -> str:
    """``uri`` as a comparable string: a local path (or ``file://`` URI) absolute with links resolved, other URIs as
    they are; no trailing slash."""
    from pathlib import Path
    from urllib.parse import unquote, urlparse

    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        return str(Path(unquote(parsed.path) if parsed.scheme == "file" else uri).resolve())
    return uri.rstrip("/")


NOT_IN_CENSUS = ("its rows are named by the Census' census_info/datasets table, and the experiment was not given "
                 "inside a Census (CENSUS/census_data/NAME, CENSUS holding census_info/datasets)")


def _census_datasets(uri: str, context: Any) -> tuple[Any | None, str]:
    """``(table, "")``: the Census' ``census_info/datasets`` DataFrame when ``uri`` is the experiment
    ``census_data/<name>`` of a Census collection two levels up (the collection names it as that member, and the
    table lies inside the collection); else ``(None, why not)``."""
    import tiledbsoma

    parts = _plain(uri).rsplit("/", 2)
    if len(parts) != 3 or parts[1] != "census_data":
        return None, NOT_IN_CENSUS
    root, name = parts[0], parts[2]
    try:
        census = tiledbsoma.Collection.open(root, context=context)
    except Exception:  # noqa: BLE001 - not a SOMA collection: not a Census layout
        return None, NOT_IN_CENSUS
    try:
        data = census.get("census_data", None)
        if data is None or name not in data or _plain(data[name].uri) != _plain(uri):
            return None, NOT_IN_CENSUS
        info = census.get("census_info", None)
        if info is None or "datasets" not in info:
            return None, "the Census around it has no census_info/datasets table to name its rows"
        table = info["datasets"]
        if not member_inside(root, str(table.uri)):
            raise InputError(f"{root}: its census_info/datasets table lies outside the Census collection; scatlas "
                             "reads only tables inside the collection it was given")
        return table.read(column_names=["soma_joinid", "dataset_id"]).concat().to_pandas(), ""
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged Census: said, and every gene taken as measured
        return None, f"the Census' census_info/datasets table cannot be read ({type(exc).__name__})"
    finally:
        census.close()


def measured_by_dataset(uri: str, ms: Any, n_vars: int, dataset_ids: list[str], context: Any) -> dict[str, np.ndarray]:
    """Bool per var ``soma_joinid`` (``0..n_vars-1``) of the genes each of ``dataset_ids`` measured, for the datasets
    the presence matrix has a row for; ``{}`` when the measurement has no presence matrix. A matrix whose rows cannot
    be named (no Census around the experiment) is said in a warning, and its datasets' genes are all taken as
    measured."""
    if PRESENCE_MATRIX not in ms:
        return {}
    table, why = _census_datasets(uri, context)
    if table is None:
        logger.warning("%s: the experiment records which genes each dataset measured (%s), but %s: every gene is "
                       "taken as measured in every dataset", uri, PRESENCE_MATRIX, why)
        return {}
    rows = dict(zip(table["dataset_id"].astype(str), table["soma_joinid"].astype(np.int64), strict=True))
    matrix = ms[PRESENCE_MATRIX]
    n_rows, n_cols = (int(v) for v in matrix.shape)
    if n_cols < n_vars:
        raise InputError(f"{uri}: its {PRESENCE_MATRIX} has {n_cols} columns for {n_vars} genes; is the Census "
                         "complete?")
    out: dict[str, np.ndarray] = {}
    for dataset_id in dataset_ids:
        row = rows.get(dataset_id)
        if row is None or not 0 <= row < n_rows:
            continue
        got = matrix.read(coords=([int(row)],)).tables().concat()
        cols = got.column("soma_dim_1").to_numpy()[got.column("soma_data").to_numpy().astype(bool)]
        cols = cols[(cols >= 0) & (cols < n_vars)]
        mask = np.zeros(n_vars, dtype=bool)
        mask[cols] = True
        out[dataset_id] = mask
    missing = [d for d in dataset_ids if d not in out]
    if missing:
        logger.warning("%s: %d of its %d datasets have no row in %s (%s): their genes are all taken as measured", uri,
                       len(missing), len(dataset_ids), PRESENCE_MATRIX, escaped_list(missing, 5))
    return out
