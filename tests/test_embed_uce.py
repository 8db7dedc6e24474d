"""UCE embedder with a tiny randomly initialised model written to tmp_path (nothing is downloaded)."""

from __future__ import annotations

import importlib.util
import pickle
import shutil
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scatlas.atlas.embed.registry import load_embedder, make_embedder
from scatlas.atlas.errors import DependencyError, InputError, StoreError
from scatlas.atlas.genes import GeneVocabulary
from scatlas.atlas.normalize import to_lognorm
from tests.helpers_embed import chunk_of, make_counts

HAS_UCE = importlib.util.find_spec("uce") is not None
# find_spec, not importorskip: importing the uce package needs scanpy/gdown, which the embedder does not use
needs_uce = pytest.mark.skipif(not HAS_UCE, reason="uce-model is not installed (pip install 'scatlas[uce]')")

N_GENES = 120  # genes of the synthetic data
N_MODEL_GENES = 100  # genes with a protein embedding (GENE1..GENE100) of which GENE1..GENE95 have a position
TOKEN_DIM, D_MODEL, NHEAD, D_HID, NLAYERS, OUT_DIM = 16, 32, 4, 64, 2, 24
OFFSET, CHROM_OFFSET, N_CHROM = 10, 150, 8
TINY = dict(
    species="human", nlayers=NLAYERS, output_dim=OUT_DIM, d_hid=D_HID, token_dim=TOKEN_DIM, d_model=D_MODEL,
    nhead=NHEAD, pad_length=64, sample_size=40, chrom_token_offset=CHROM_OFFSET, n_chrom_tokens=N_CHROM,
    batch_size=16, device="cpu",
)


def _write_model_files(root: Path, seed: int = 0) -> dict[str, Path]:
    from scatlas.atlas.embed.uce import SPECIES_FILES, _uce_model

    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    pe_dir = root / "protein_embeddings"
    pe_dir.mkdir(exist_ok=True)
    # mixed-case keys: the package upper-cases them
    table = {(f"GENE{i + 1}" if i % 7 else f"Gene{i + 1}"): torch.randn(5120 // 320, generator=g)
             for i in range(N_MODEL_GENES)}
    torch.save(table, pe_dir / SPECIES_FILES["human"])
    chroms = ["1", "2", "3", "X", "MT"]
    rows = [("human", f"GENE{i + 1}", chroms[i % 5], int(rng.integers(1, 10**8))) for i in range(95)]
    rows += [("mouse", f"Gene{i + 1}", str(i % 3 + 1), i) for i in range(20)]
    pd.DataFrame(rows, columns=["species", "gene_symbol", "chromosome", "start"]).to_csv(root / "species_chrom.csv")
    with open(root / "species_offsets.pkl", "wb") as fh:
        pickle.dump({"human": OFFSET, "mouse": OFFSET + N_MODEL_GENES}, fh)
    tokens = torch.randn(CHROM_OFFSET, TOKEN_DIM, generator=g)
    torch.save(tokens, root / "all_tokens.torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        net = _uce_model().TransformerModel(token_dim=TOKEN_DIM, d_model=D_MODEL, nhead=NHEAD, d_hid=D_HID,
                                            nlayers=NLAYERS, output_dim=OUT_DIM, dropout=0.05)
    chrom = torch.normal(0.0, 1.0, size=(N_CHROM, TOKEN_DIM), generator=torch.Generator().manual_seed(23))
    net.pe_embedding = torch.nn.Embedding.from_pretrained(torch.vstack((tokens, chrom)))
    torch.manual_seed(seed)
    for p in net.parameters():  # default init leaves LayerNorms at identity: randomise everything a little
        with torch.no_grad():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    torch.save(net.state_dict(), root / "4layer_model.torch")
    return {"model_dir": root, "model_path": root / "4layer_model.torch", "token_file": root / "all_tokens.torch"}


def uce(files, **kw):
    """The tiny UCE embedder from a model_files directory (the weights are named explicitly: 2 layers)."""
    root = Path(files["model_dir"])
    return make_embedder("uce", model_dir=root, model_path=root / "4layer_model.torch", **kw)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    if not HAS_UCE:
        pytest.skip("uce-model is not installed")
    return _write_model_files(tmp_path_factory.mktemp("uce"))


@pytest.fixture(scope="module")
def emb(files):
    return uce(files, **TINY)


@pytest.fixture(scope="module")
def data():
    return make_counts(n_cells=90, n_genes=N_GENES, n_markers=20, n_zero_genes=0, seed=3)


def _symbols(data) -> GeneVocabulary:
    return GeneVocabulary.from_identifiers(list(data.genes.feature_name))


@needs_uce
def test_shapes_determinism_and_row_independence(emb, data):
    genes = _symbols(data)
    full = emb.transform(chunk_of(data.counts, genes))
    assert full.shape == (90, OUT_DIM) and full.dtype == np.float32
    assert np.isfinite(full).all()
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, atol=1e-5)
    assert np.abs(full - full.mean(axis=0)).max() > 1e-3  # cells differ
    np.testing.assert_array_equal(emb.transform(chunk_of(data.counts, genes)), full)
    for i in (0, 41, 89):
        alone = emb.transform(chunk_of(data.counts[i : i + 1], genes))
        np.testing.assert_allclose(alone[0], full[i], atol=1e-5)
    # other chunk mates, other batch size, another instance: same vectors
    other = uce({"model_dir": Path(emb.config.model_path).parent}, **{**TINY, "batch_size": 5})
    rev = other.transform(chunk_of(data.counts[::-1], genes))[::-1]
    np.testing.assert_allclose(rev, full, atol=1e-5)


@needs_uce
def test_padding_is_masked(emb, data):
    """A short sentence (one expressed gene) gets the same vector alone and padded in a batch of long ones."""
    genes = _symbols(data)
    X = data.counts[:4].toarray()
    X[0] = 0
    X[0, 0] = 3  # GENE1 only: CLS + one chromosome block
    X = sp.csr_matrix(X)
    batch = emb.transform(chunk_of(X, genes))
    alone = emb.transform(chunk_of(X[:1], genes))
    np.testing.assert_allclose(alone[0], batch[0], atol=1e-5)
    W = emb._weights(chunk_of(X, genes))
    assert len(emb._sentence(W.indices[:1], W.data[:1])) == 1 + emb.config.sample_size + 2


@needs_uce
def test_gene_matching(emb, data):
    genes = _symbols(data)
    match = emb.gene_match(genes)
    assert len(emb.genes) == 95  # genes with both a protein embedding and a chromosome position
    assert match.n_matched == 95 and match.fraction_of_target == 1.0
    ref = emb.transform(chunk_of(data.counts, genes))
    perm = np.random.default_rng(0).permutation(N_GENES)
    lower = GeneVocabulary.from_identifiers([s.lower() for s in data.genes.feature_name[perm]])
    np.testing.assert_allclose(emb.transform(chunk_of(data.counts[:, perm], lower)), ref, atol=1e-5)
    # Ensembl ids alone cannot be matched: UCE knows symbols only
    assert emb.gene_match(data.genes.__class__.from_identifiers(list(data.genes.feature_id))).n_matched == 0
    # a query lacking some of the model's genes: those are simply never sampled
    keep = np.r_[10:N_GENES]
    part = GeneVocabulary.from_identifiers(list(data.genes.feature_name[keep]))
    assert emb.gene_match(part).n_matched == 85
    out = emb.transform(chunk_of(data.counts[:, keep], part))
    assert out.shape == (90, OUT_DIM) and np.isfinite(out).all()


@needs_uce
def test_sentences_follow_the_package(emb, data, monkeypatch):
    """Our sentence equals uce.eval_data.sample_cell_sentences fed with the same random generator."""
    spec = importlib.util.find_spec("uce")
    path = Path(list(spec.submodule_search_locations)[0]) / "eval_data.py"
    mod_spec = importlib.util.spec_from_file_location("scatlas_test_uce_eval_data", path)
    eval_data = importlib.util.module_from_spec(mod_spec)
    saved = list(sys.path)
    with warnings.catch_warnings():  # the module switches warnings off globally
        mod_spec.loader.exec_module(eval_data)
    sys.path[:] = saved
    cfg = emb.config
    gm = emb._gene_map()
    args = SimpleNamespace(sample_size=cfg.sample_size, pad_length=cfg.pad_length, cls_token_idx=cfg.cls_token_idx,
                           CHROM_TOKEN_OFFSET=cfg.chrom_token_offset, chrom_token_right_idx=cfg.chrom_token_right_idx,
                           pad_token_idx=cfg.pad_token_idx)
    W = emb._weights(chunk_of(data.counts, _symbols(data)))
    counts = data.counts[:, _symbols(data).locate_vocabulary(emb.genes)].toarray()
    for i in range(0, 90, 9):
        cols = W.indices[W.indptr[i] : W.indptr[i + 1]]
        vals = W.data[W.indptr[i] : W.indptr[i + 1]]
        np.testing.assert_allclose(vals, np.log1p(counts[i, cols]), rtol=1e-6)
        ours = emb._sentence(cols, vals)
        n_chroms = int((ours >= cfg.chrom_token_offset).sum())
        assert ours[0] == cfg.cls_token_idx and (ours == cfg.chrom_token_right_idx).sum() == n_chroms
        assert len(ours) == 1 + cfg.sample_size + 2 * n_chroms
        weights = np.zeros(len(gm.symbols))
        weights[cols] = vals
        proxy = _NumpyWithRandom(emb._cell_rng(cols, vals))
        monkeypatch.setattr(eval_data, "np", proxy)
        sentences, mask, length, _ = eval_data.sample_cell_sentences(
            torch.zeros(1, len(weights)), torch.from_numpy(weights[None] / weights.sum()), "d", args,
            dataset_to_protein_embeddings={"d": torch.from_numpy(gm.tokens)},
            dataset_to_chroms={"d": gm.chroms}, dataset_to_starts={"d": gm.starts},
        )
        theirs = sentences[0, :length].numpy().astype(np.int64)
        np.testing.assert_array_equal(ours, theirs)
        assert int(mask[0].sum()) == len(ours)


class _NumpyWithRandom:
    """numpy, with ``random`` replaced by a Generator (the package draws from numpy's global state)."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.random = rng

    def __getattr__(self, name: str):
        return getattr(np, name)


@needs_uce
def test_single_cell_equals_package_forward(emb, data):
    """Without padding our forward is the package's forward with its own all-ones mask."""
    W = emb._weights(chunk_of(data.counts[:1], _symbols(data)))
    s = emb._sentence(W.indices, W.data)
    net = emb._model()
    with torch.no_grad():
        src = torch.nn.functional.normalize(net.pe_embedding(torch.from_numpy(s)[:, None]), dim=2)
        _, ref = net(src, torch.ones(1, len(s)))
    np.testing.assert_allclose(emb.transform(chunk_of(data.counts[:1], _symbols(data)))[0], ref[0].numpy(),
                               atol=1e-6)


@needs_uce
def test_counts_versus_lognorm(files, data, caplog):
    genes = _symbols(data)
    lognorm = to_lognorm(data.counts, "counts")
    emb = uce(files, **{**TINY, "weighting": "lognorm"})
    a = emb.transform(chunk_of(data.counts, genes, "counts"))
    b = emb.transform(chunk_of(lognorm, genes, "lognorm"))
    np.testing.assert_allclose(a, b, atol=1e-5)
    raw = uce(files, **TINY)
    assert raw.fingerprint() != emb.fingerprint()
    with caplog.at_level("WARNING", logger="scatlas.atlas.embed.uce"):
        c = raw.transform(chunk_of(lognorm, genes, "lognorm"))
    assert "trained on raw counts" in caplog.text
    assert c.shape == a.shape and np.isfinite(c).all()
    # log1p(counts) and log1p(CP10k) weights give other sentences
    assert not np.allclose(raw.transform(chunk_of(data.counts, genes)), c, atol=1e-3)


@needs_uce
def test_save_load_round_trip(files, data, tmp_path):
    root = tmp_path / "model_files"
    shutil.copytree(files["model_dir"], root)
    emb = uce({"model_dir": root}, **TINY)
    chunk = chunk_of(data.counts, _symbols(data))
    ref = emb.transform(chunk)
    emb.save(tmp_path / "e")
    assert (tmp_path / "e" / "uce_genes.npz").is_file() and (tmp_path / "e" / "uce_files.json").is_file()
    # the saved mapping replaces the protein-embedding / chromosome / offset files
    shutil.rmtree(root / "protein_embeddings")
    (root / "species_chrom.csv").unlink()
    loaded = load_embedder(tmp_path / "e")
    assert loaded.fingerprint() == emb.fingerprint()
    np.testing.assert_allclose(loaded.transform(chunk), ref, atol=1e-6)
    # other weights under the same path are detected
    state = torch.load(root / "4layer_model.torch")
    state["decoder.3.bias"] += 1.0
    torch.save(state, root / "4layer_model.torch")
    with pytest.raises(StoreError, match="fingerprint"):
        load_embedder(tmp_path / "e")


@needs_uce
def test_fingerprint(files, emb):
    def fp(**kw):
        return uce(files, **{**TINY, **kw}).fingerprint()

    assert fp() == emb.fingerprint()
    assert fp(batch_size=3) == emb.fingerprint()  # does not change the vectors
    assert fp(sample_size=30) != emb.fingerprint()
    assert fp(seed=1) != emb.fingerprint()


@needs_uce
def test_token_file_replaces_table_when_sizes_differ(files, tmp_path):
    root = tmp_path / "mf"
    shutil.copytree(files["model_dir"], root)
    bigger = torch.randn(CHROM_OFFSET + N_CHROM + 5, TOKEN_DIM)
    torch.save(bigger, root / "all_tokens.torch")
    emb = uce({"model_dir": root}, **TINY)
    assert torch.equal(emb._model().pe_embedding.weight, bigger)
    same = uce(files, **TINY)
    state = torch.load(files["model_path"])
    assert torch.equal(same._model().pe_embedding.weight, state["pe_embedding.weight"])


@needs_uce
def test_bad_inputs(files, tmp_path):
    with pytest.raises(InputError, match="nothing is downloaded"):
        make_embedder("uce", **TINY)
    with pytest.raises(InputError, match="does not exist"):
        make_embedder("uce", model_path=tmp_path / "none.torch", token_file=files["token_file"], **TINY)
    with pytest.raises(InputError, match="fit"):
        uce(files, **{**TINY, "d_model": 64})._model()
    with pytest.raises(InputError):
        uce(files, **{**TINY, "weighting": "tpm"})
    emb = uce(files, **TINY)
    empty = sp.csr_matrix((2, N_GENES), dtype=np.float32)
    out = emb.transform(chunk_of(empty, GeneVocabulary.from_identifiers([f"GENE{i + 1}" for i in range(N_GENES)])))
    assert out.shape == (2, OUT_DIM) and np.allclose(out[0], out[1])  # no counts: the bare CLS sentence


def test_missing_uce_is_a_dependency_error(monkeypatch, tmp_path):
    import scatlas.atlas.embed.uce as uce_mod

    monkeypatch.setitem(sys.modules, "uce", None)
    monkeypatch.setattr(uce_mod, "_uce_model_module", None)
    with pytest.raises(DependencyError, match="uce-model"):
        make_embedder("uce", model_path=tmp_path / "m.torch", token_file=tmp_path / "t.torch", device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
def test_cuda_without_cuda_is_a_dependency_error(tmp_path):
    from scatlas.atlas.embed.uce import resolve_device

    with pytest.raises(DependencyError, match="CUDA"):
        resolve_device("cuda")
    assert resolve_device("auto") == "cpu"
    if HAS_UCE:
        with pytest.raises(DependencyError, match="CUDA"):
            make_embedder("uce", model_path=tmp_path / "m.torch", token_file=tmp_path / "t.torch", device="cuda")


@needs_uce
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(files, data):
    genes = _symbols(data)
    cpu = uce(files, **TINY)
    gpu = uce(files, **{**TINY, "device": "auto"})
    assert gpu.device == "cuda"
    assert gpu.fingerprint() == cpu.fingerprint()
    np.testing.assert_allclose(gpu.transform(chunk_of(data.counts, genes)), cpu.transform(chunk_of(data.counts, genes)),
                               atol=1e-4)


def test_pickles_without_the_model_and_moves_between_devices(emb, data):
    """What a Ray worker or a multi-GPU build does with the embedder: same vectors, model reloaded from its files."""
    import pickle

    genes = _symbols(data)
    want = emb.transform(chunk_of(data.counts[:20], genes))
    assert emb._net is not None  # loaded by the transform above
    clone = pickle.loads(pickle.dumps(emb))
    assert clone._net is None and clone.fingerprint() == emb.fingerprint()
    np.testing.assert_array_equal(clone.transform(chunk_of(data.counts[:20], genes)), want)
    assert emb.on_device("cpu") is emb


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@needs_uce
def test_a_species_offsets_file_carrying_code_is_refused_unrun(files, data, tmp_path):
    """species_offsets.pkl was read with pickle.load: a model directory from elsewhere ran its code. It is read as
    plain data now."""
    import shutil

    from scatlas.atlas.errors import StoreError

    root = tmp_path / "model"
    shutil.copytree(files["model_dir"], root)
    marker = tmp_path / "PWNED"
    (root / "species_offsets.pkl").write_bytes(pickle.dumps(_RunsCode(marker)))
    copied = {**files, "model_dir": root}
    with pytest.raises(StoreError, match="names 'posix.system'.*could run code"):
        uce(copied, **TINY).transform(chunk_of(data.counts[:5], _symbols(data)))
    assert not marker.exists()
