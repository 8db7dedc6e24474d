from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from scatlas.atlas.embed.precomputed import PrecomputedEmbedder
from scatlas.atlas.embed.registry import load_embedder, make_embedder
from scatlas.atlas.errors import InputError
from tests.helpers_embed import chunk_of, gene_vocabulary

GENES = gene_vocabulary(5)


def chunk(vectors: np.ndarray, key: str = "X_uce", start: int = 0):
    n = len(vectors)
    return chunk_of(sp.csr_matrix((n, 5), dtype=np.float32), GENES, ids=np.arange(start, start + n),
                    obsm={key: vectors})


@pytest.fixture
def vecs():
    return np.random.default_rng(0).normal(size=(20, 8))


def test_fit_learns_dim_and_transform_passes_vectors(vecs):
    emb = make_embedder("precomputed:X_uce")
    assert isinstance(emb, PrecomputedEmbedder)
    assert emb.needs == "obsm" and emb.obsm_key == "X_uce"
    assert emb.requires_fit and not emb.is_fitted
    with pytest.raises(InputError, match="not known"):
        emb.transform(chunk(vecs))
    emb.fit([chunk(vecs[:0]), chunk(vecs[:10]), chunk(vecs[10:], start=10)])
    assert emb.dim == 8 and emb.params() == {"key": "X_uce", "dim": 8}
    out = emb.transform(chunk(vecs))
    assert out.dtype == np.float32 and out.shape == (20, 8)
    np.testing.assert_array_equal(out, vecs.astype(np.float32))
    # row-preserving, and the chunk's own array is not shared with the output
    one = emb.transform(chunk(vecs[3:4]))
    np.testing.assert_array_equal(one[0], out[3])
    src = vecs.astype(np.float32)
    res = emb.transform(chunk(src))
    res[:] = 0
    assert src.any()
    assert emb.gene_match(GENES) is None


def test_fit_accepts_iterators_and_callables(vecs):
    a = PrecomputedEmbedder("X_uce")
    a.fit(iter([chunk(vecs)]))
    b = PrecomputedEmbedder("X_uce")
    b.fit(lambda: iter([chunk(vecs)]))
    assert a.dim == b.dim == 8


def test_errors(vecs):
    emb = PrecomputedEmbedder("X_uce", dim=8)
    with pytest.raises(InputError, match=r"missing \(available obsm keys: X_pca, X_scvi\)"):
        emb.transform(chunk_of(sp.csr_matrix((2, 5), dtype=np.float32), GENES,
                               obsm={"X_scvi": vecs[:2], "X_pca": vecs[:2]}))
    with pytest.raises(InputError, match="expected"):
        emb.transform(chunk(vecs[:, :6]))
    with pytest.raises(InputError, match="expected"):
        emb.transform(chunk_of(sp.csr_matrix((3, 5), dtype=np.float32), GENES, obsm={"X_uce": vecs[:2]}))
    bad = vecs.copy()
    bad[4, 1] = np.nan
    bad[7, 0] = np.inf
    with pytest.raises(InputError, match=r"non-finite.*\[4, 7\]"):
        emb.transform(chunk(bad))
    with pytest.raises(InputError, match="dim=8"):
        emb.fit([chunk(vecs[:, :4])])
    with pytest.raises(InputError, match="empty"):
        PrecomputedEmbedder("X_uce").fit([])
    with pytest.raises(InputError, match="key"):
        make_embedder("precomputed")


def test_save_load_and_fingerprint(vecs, tmp_path):
    emb = PrecomputedEmbedder("X_uce")
    emb.fit([chunk(vecs)])
    emb.save(tmp_path / "e")
    loaded = load_embedder(tmp_path / "e")
    assert isinstance(loaded, PrecomputedEmbedder)
    assert loaded.fingerprint() == emb.fingerprint() and loaded.dim == 8
    np.testing.assert_array_equal(loaded.transform(chunk(vecs)), emb.transform(chunk(vecs)))
    assert PrecomputedEmbedder("X_uce", dim=8).fingerprint() == emb.fingerprint()
    assert PrecomputedEmbedder("X_uce", dim=9).fingerprint() != emb.fingerprint()
    assert PrecomputedEmbedder("X_scvi", dim=8).fingerprint() != emb.fingerprint()
