"""What the store's cell reads include: stored embeddings (obsm) every dataset read must hold, and the cell
metadata columns an embedder asks for (``CellChunk.obs``)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scatlas.atlas import AtlasStore, ingest
from scatlas.atlas.chunks import obs_values
from scatlas.atlas.errors import InputError


def _with_emb(ad):
    ad.obsm["X_emb"] = np.random.default_rng(0).normal(size=(ad.n_obs, 4)).astype(np.float32)
    return ad


def test_obsm_missing_from_a_dataset_is_refused_before_reading(tmp_path, h5ad_factory):
    ingest([h5ad_factory("a", n_cells=60, transform=_with_emb), h5ad_factory("b", n_cells=40, seed=2),
            h5ad_factory("c", n_cells=30, seed=3)], tmp_path / "atlas", progress=False)
    store = AtlasStore.open(tmp_path / "atlas")
    for reader in (store.iter_chunks(chunk_size=25, with_X=False, obsm_keys=["X_emb"]),
                   store.read_cells(np.arange(0, 130, 3), with_X=False, obsm_keys=["X_emb"])):
        with pytest.raises(InputError, match=r"obsm\['X_emb'\] is missing from 2 of the 3 dataset\(s\)") as err:
            next(reader)  # before the first chunk, not mid-stream
        assert "'b'" not in str(err.value) and "'c'" not in str(err.value)  # no dataset ids echoed
    # reads that cover only datasets holding the key work, and a key no dataset has is named as such
    got = np.vstack([c.obsm["X_emb"] for c in store.iter_chunks(0, 60, chunk_size=25, with_X=False,
                                                                 obsm_keys=["X_emb"])])
    assert got.shape == (60, 4) and np.isfinite(got).all()
    assert len(list(store.read_cells(np.arange(10, 50), with_X=False, obsm_keys=["X_emb"]))) == 1
    with pytest.raises(InputError, match=r"no obsm\['nope'\]"):
        next(store.iter_chunks(obsm_keys=["nope"]))


def test_obs_columns_are_read_in_chunk_order(tmp_path, h5ad_factory):
    def with_batch(ad):
        ad.obs["batch"] = pd.Categorical(np.where(np.arange(ad.n_obs) % 3 == 0, "x", "y"))
        ad.obs["lane"] = np.arange(ad.n_obs) % 4  # numbers: read as strings
        return ad

    a = h5ad_factory("a", n_cells=50, transform=with_batch)
    ingest([a, h5ad_factory("b", n_cells=30, seed=2)], tmp_path / "atlas", progress=False)
    store = AtlasStore.open(tmp_path / "atlas")
    chunks = list(store.iter_chunks(chunk_size=20, with_X=False, obs_columns=["batch", "lane", "donor_id"]))
    batch = np.concatenate([c.obs["batch"] for c in chunks])
    expected = np.where(np.arange(50) % 3 == 0, "x", "y").astype(object)
    assert list(batch[:50]) == list(expected)
    assert list(batch[50:]) == [None] * 30  # dataset b has no such column: missing, not a string "None"
    assert list(np.concatenate([c.obs["lane"] for c in chunks])[:8]) == ["0", "1", "2", "3", "0", "1", "2", "3"]
    donors = store.obs(np.arange(80), ["donor_id"])["donor_id"].tolist()
    assert list(np.concatenate([c.obs["donor_id"] for c in chunks])) == donors
    ids = np.array([1, 3, 4, 48, 49, 50, 79])
    picked = list(store.read_cells(ids, chunk_size=2, with_X=False, obs_columns=["batch"]))
    assert [list(c.obs) for c in picked] == [["batch"]] * len(picked)
    assert list(np.concatenate([c.obs["batch"] for c in picked])) == [
        "y", "x", "y", "x", "y", None, None]
    assert all(c.obs == {} for c in store.iter_chunks(chunk_size=40, with_X=False))  # nothing asked, nothing read
    with pytest.raises(InputError, match="no obs column 'plate'"):
        next(store.iter_chunks(obs_columns=["plate"]))


def test_obs_values_are_strings_or_none():
    got = obs_values(pd.Series([1, None, "a", float("nan"), pd.NA, True], dtype=object))
    assert list(got) == ["1", None, "a", None, None, "True"]
    assert list(obs_values(pd.Categorical(["u", None, "u"]))) == ["u", None, "u"]
    assert obs_values([]).shape == (0,)
