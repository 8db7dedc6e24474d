"""Train and sweep against real (flat) indexes of planted vectors: recovery, exactness, refusals, resume."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pandas as pd
import pytest

from scatlas.atlas.errors import DependencyError, EmbedderMismatchError, InputError
from scatlas.query.hunt import HuntClassifier, sweep, train
from scatlas.query.hunt.calibration import Calibration
from tests.test_hunt_helpers import build_vector_index, exact_hits, planted

sweep_mod = importlib.import_module("scatlas.query.hunt.sweep")  # the package exports the function under the same name

LABELLED = "cell_type = 'Norn cell'"  # rare cells annotated in dataset ds0 only


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    data = planted(n=20_000, d=32, fraction=0.005, seed=0, gap=1)  # ids with holes
    idx = build_vector_index(tmp_path_factory.mktemp("hunt_idx"), data)
    return data, idx


@pytest.fixture(scope="module")
def clf(atlas):
    _, idx = atlas
    return train(idx, positive_sql=LABELLED, background=4000, n_folds=3, progress=False)


def _classifier(dim: int, fingerprint: str, seed: int = 0, threshold: float = 0.5) -> HuntClassifier:
    w = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return HuntClassifier(w, -0.1, threshold, Calibration("platt", a=1.0, b=0.0), fingerprint, "test")


@pytest.mark.parametrize("fraction", [0.0005, 0.01])
def test_train_on_one_dataset_and_sweep_recovers_the_planted_population(tmp_path, fraction):
    data = planted(n=40_000 if fraction < 0.001 else 20_000, d=32, fraction=fraction, seed=1)
    idx = build_vector_index(tmp_path, data, shard_size=15_000)
    n_labelled = int((data.is_rare & (data.dataset == "ds0")).sum())
    assert 3 <= n_labelled < data.is_rare.sum()  # a few labelled cells from one dataset; the rest unlabelled
    clf = train(idx, positive_sql=LABELLED, background=5000, n_folds=3, progress=False)
    summary = sweep(idx, clf, tmp_path / "sweep", progress=False)
    hits = pd.read_parquet(summary.hits_path)
    truth = set(data.ids[data.is_rare].tolist())
    got = set(hits["soma_joinid"].tolist())
    recall = len(got & truth) / len(truth)
    precision = len(got & truth) / max(len(got), 1)
    assert recall >= 0.9 and precision >= 0.9, (recall, precision, len(truth), len(got))
    # rare cells of the unlabelled datasets were found too, not only the labelled ones
    assert {"ds0", "ds2"} <= set(hits["dataset_id"]) and "ds1" not in set(hits.loc[hits["truth_is_rare"], "dataset_id"])


def test_sweep_equals_brute_force_whatever_the_block_size(atlas, clf, tmp_path):
    data, idx = atlas
    want_ids, want_scores = exact_hits(data, clf.weights, clf.bias, clf.threshold)
    for block in (257, 100_000):
        s = sweep(idx, clf, tmp_path / f"b{block}", block_size=block, progress=False)
        hits = pd.read_parquet(s.hits_path)
        order = np.argsort(want_ids)
        got = hits.sort_values("soma_joinid")
        np.testing.assert_array_equal(got["soma_joinid"].to_numpy(), want_ids[order])
        np.testing.assert_array_equal(got["score"].to_numpy(), want_scores[order])
        assert (np.diff(hits["score"].to_numpy()) <= 0).all()  # best first
        np.testing.assert_allclose(hits["probability"], clf.probability(hits["score"].to_numpy()), rtol=1e-6)
        assert {"dataset_id", "tissue", "disease", "cell_type"} <= set(hits.columns)
        assert s.n_cells == len(data.ids) and s.n_hits == len(want_ids) and s.n_shards == 3
        assert s.gb_per_second > 0 and s.cells_per_second > 0 and s.kernel_max_error < 1e-2
        assert json.loads((tmp_path / f"b{block}" / "summary.json").read_text())["n_hits"] == s.n_hits


def test_min_score_and_min_probability_cuts(atlas, clf, tmp_path):
    data, idx = atlas
    s = sweep(idx, clf, tmp_path / "ms", min_score=clf.threshold + 2.0, progress=False)
    assert s.n_hits == len(exact_hits(data, clf.weights, clf.bias, clf.threshold + 2.0)[0])
    p = sweep(idx, clf, tmp_path / "mp", min_probability=0.9, progress=False)
    assert p.cutoff == pytest.approx(clf.calibration.min_score_for(0.9))
    assert (pd.read_parquet(p.hits_path)["probability"] >= 0.9 - 1e-5).all()
    with pytest.raises(InputError, match="not both"):
        sweep(idx, clf, tmp_path / "x", min_score=1.0, min_probability=0.5, progress=False)


def test_classifier_round_trips_and_is_refused_for_another_embedder(atlas, clf, tmp_path):
    data, idx = atlas
    path = clf.save(tmp_path / "clf")
    back = HuntClassifier.load(path)
    assert back.fingerprint() == clf.fingerprint() and back.weights.dtype == np.float32
    assert back.counts == clf.counts and back.metrics["auprc"] == clf.metrics["auprc"]
    assert back.embedder_fingerprint == "emb-A" and back.index_manifest_id == clf.index_manifest_id
    other = build_vector_index(tmp_path, data, fingerprint="emb-B", name="other")
    with pytest.raises(EmbedderMismatchError, match="emb-A.*emb-B"):
        sweep(other, path, tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()
    meta = json.loads((path / "classifier.json").read_text())
    (path / "classifier.json").write_text(json.dumps({**meta, "dim": meta["dim"] + 1}))
    with pytest.raises(InputError, match="another dimension than its weights"):
        HuntClassifier.load(path)
    meta["threshold"] = meta["threshold"] - 1.0
    (path / "classifier.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="modified"):
        HuntClassifier.load(path)


def test_interrupted_sweep_resumes_per_shard_with_identical_hits(atlas, clf, tmp_path, monkeypatch):
    _, idx = atlas
    full = sweep(idx, clf, tmp_path / "full", progress=False)
    real = sweep_mod._score_shard
    calls = []

    def crash_in_second_shard(scorer, ids, vecs, block_size, bar):
        calls.append(len(ids))
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real(scorer, ids, vecs, block_size, bar)

    monkeypatch.setattr(sweep_mod, "_score_shard", crash_in_second_shard)
    with pytest.raises(KeyboardInterrupt):
        sweep(idx, clf, tmp_path / "resumed", progress=False)
    state = json.loads((tmp_path / "resumed" / "sweep.json").read_text())
    assert list(state["shards"]) == ["0000"] and not state["complete"]
    assert not (tmp_path / "resumed" / "hits.parquet").exists()
    monkeypatch.setattr(sweep_mod, "_score_shard", real)
    again = sweep(idx, clf, tmp_path / "resumed", progress=False)
    assert (again.n_shards_resumed, again.n_shards_scored) == (1, 2)
    a, b = pd.read_parquet(full.hits_path), pd.read_parquet(again.hits_path)
    pd.testing.assert_frame_equal(a, b)
    done = sweep(idx, clf, tmp_path / "resumed", progress=False)  # every shard resumed: nothing scored
    assert (done.n_shards_scored, done.cells_scored) == (0, 0)
    assert done.cells_per_second == 0.0 and done.gb_per_second == 0.0  # not NaN


def test_rerun_with_another_classifier_is_refused_unless_restarted(atlas, clf, tmp_path):
    data, idx = atlas
    sweep(idx, clf, tmp_path / "s", progress=False)
    other = _classifier(32, "emb-A", seed=3, threshold=1.0)
    with pytest.raises(InputError, match="different sweep.*classifier.*resume=False"):
        sweep(idx, other, tmp_path / "s", progress=False)
    s = sweep(idx, other, tmp_path / "s", resume=False, progress=False)
    assert s.n_shards_resumed == 0
    assert s.n_hits == len(exact_hits(data, other.weights, other.bias, 1.0)[0])


def test_empty_positive_set_and_missing_negatives_are_refused(atlas, tmp_path):
    data, idx = atlas
    with pytest.raises(InputError, match="empty positive set.*Norn cel'"):
        train(idx, positive_sql="cell_type = 'Norn cel'", progress=False)
    with pytest.raises(InputError, match="invalid SQL predicate.*Columns of the cells table"):
        train(idx, positive_sql="celltype = 'Norn cell'", progress=False)
    with pytest.raises(InputError, match="no negative cells"):
        train(idx, positive_sql=LABELLED, background=0, progress=False)
    with pytest.raises(InputError, match="at least 3"):
        train(idx, positive_sql="soma_joinid IN (0, 2)", progress=False)


def test_cuda_device_without_cuda_is_refused(atlas, clf, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    _, idx = atlas
    with pytest.raises(DependencyError, match="CUDA"):
        sweep(idx, clf, tmp_path / "gpu", device="cuda", progress=False)


@pytest.mark.gpu
def test_gpu_sweep_and_training_match_the_cpu(atlas, clf, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    data, idx = atlas
    cpu = sweep(idx, clf, tmp_path / "cpu", device="cpu", progress=False)
    gpu = sweep(idx, clf, tmp_path / "gpu", device="cuda", progress=False)
    assert gpu.device == "cuda"
    pd.testing.assert_frame_equal(pd.read_parquet(cpu.hits_path), pd.read_parquet(gpu.hits_path))
    g = train(idx, positive_sql=LABELLED, background=4000, n_folds=3, device="cuda", progress=False)
    assert g.metrics["auprc"] == pytest.approx(clf.metrics["auprc"], abs=0.05)


@pytest.mark.gpu
def test_sweep_spreads_shards_over_every_gpu(atlas, clf, tmp_path):
    import torch

    from scatlas.index.executor import LocalExecutor

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _, idx = atlas
    n = torch.cuda.device_count()
    cpu = sweep(idx, clf, tmp_path / "cpu", device="cpu", progress=False)
    multi = sweep(idx, clf, tmp_path / "multi", device="cuda", progress=False,
                  executor=LocalExecutor([f"cuda:{i}" for i in range(n)]))
    pd.testing.assert_frame_equal(pd.read_parquet(cpu.hits_path), pd.read_parquet(multi.hits_path))


def test_an_index_of_vectors_alone_hunts_with_stage_one_and_says_why(atlas, clf, tmp_path):
    """An index built from vectors (no embedder that reads genes, no atlas store) has no stage 2: the classifier
    records why, `--stages 2` is refused saying so, and the sweep's hits are stage 1's."""
    data, idx = atlas
    assert clf.stage2 is None and "no embedder to read genes with" in clf.params["stage2_skipped"]
    with pytest.raises(InputError, match="no embedder to read genes with"):
        train(idx, positive_sql=LABELLED, background=4000, n_folds=3, progress=False, two_stage=True)
    summary = sweep(idx, clf, tmp_path / "sweep", progress=False)
    assert summary.n_stage2_kept is None and summary.stages.startswith("stage 1 only")
