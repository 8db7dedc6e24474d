"""The two-stage hunt on a counts-level synthetic atlas whose embedding blurs the rare population.

The rare type differs from the others on 6 marker genes only, and the index's PCA keeps 3 components (dominated by
the common types), so stage 1 (the linear score on stored vectors) cannot separate it; stage 2 (on gene
features read from the atlas store, standardised within each batch) can, also when the labelled cells come from a
strongly shifted batch that the atlas does not hold.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from scatlas.atlas import ingest
from scatlas.atlas.errors import InputError, TaskError
from scatlas.atlas.synthetic import RareType, SyntheticAtlasConfig, write_h5ad_datasets
from scatlas.cli import cli
from scatlas.index import AtlasIndex, BuildConfig, LocalExecutor, RayExecutor, build_index
from scatlas.query.hunt import HuntClassifier, sweep, train
from scatlas.query.hunt.calibration import Calibration
from scatlas.query.hunt.classifier import STAGE2_WEIGHTS_FILE
from scatlas.query.hunt.gene_reads import dataset_gene_stats, iter_gene_features, open_index_store
from scatlas.query.hunt.stage2 import (
    GeneStage,
    GeneStats,
    prefer_two_stages,
    stage1_candidate_cut,
    standardize,
)
from tests.conftest import run_cli

stage2_sweep = importlib.import_module("scatlas.query.hunt.sweep_stage2")
stage2_tasks = importlib.import_module("scatlas.query.hunt.stage2_tasks")
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # one ~20 s atlas for the module

RARE = "Norn cell"
CONFIG = SyntheticAtlasConfig(
    n_cells=5000, n_genes=300, n_datasets=3, n_donors=2, seed=1, non_primary_fraction=0.0, batch_sigma=0.1,
    rare_types=(RareType(RARE, 0.03, datasets=(0, 1, 2)),), n_rare_markers=6, marker_lfc=(4.0, 4.5),
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hunt_two_stage")
    files = write_h5ad_datasets(CONFIG, root / "h5ad")
    idx = _build(root, files)
    clf = train(idx, files[0], positive=f"cell_type = '{RARE}'", background=3000, progress=False, out=root / "clf",
                two_stage=True)
    truth = set(idx.connect().cursor().execute(f"SELECT soma_joinid FROM cells WHERE cell_type = '{RARE}'").df()
                ["soma_joinid"].tolist())
    return {"root": root, "index": idx, "clf": clf, "truth": truth, "cells": files[0]}


def _build(root, files):
    ingest(files, root / "atlas", progress=False)
    build_index(
        root / "atlas", root / "index", embedder="pca", fit_sample=5000,
        embedder_options={"n_hvg": 250, "n_components": 3},
        config=BuildConfig(shard_size=2000, eval_queries=100, calibration_cells=200),
    )
    return AtlasIndex.open(root / "index")


def _quality(summary, truth: set[int]) -> tuple[float, float]:
    got = set(pd.read_parquet(summary.hits_path)["soma_joinid"].tolist())
    tp = len(got & truth)
    return tp / max(len(got), 1), tp / len(truth)


def test_auto_keeps_stage_two_where_cross_validation_says_it_helps(world, tmp_path):
    """``two_stage="auto"`` trains stage 2 and keeps it here, where the embedding blurs the population; the choice and
    the figures behind it are recorded, and the sweep is the two-stage one."""
    clf = train(world["index"], world["cells"], positive=f"cell_type = '{RARE}'",
                background=3000, progress=False, two_stage="auto")
    assert clf.stage2 is not None and "stage2_skipped" not in clf.params
    m2 = clf.stage2.metrics
    assert m2["two_stage"]["f1"] > m2["stage1_alone"]["f1"]
    assert clf.params["two_stage"] == "auto" and " > stage 1 alone's " in clf.params["stage_choice"]
    assert clf.stage2.fingerprint() == world["clf"].stage2.fingerprint()  # the stage 2 that two_stage=True trains


def test_auto_drops_stage_two_when_stage_one_alone_is_as_good(world, monkeypatch, tmp_path):
    """When cross-validation favours stage 1 alone, "auto" returns a one-stage classifier and says why; the stage 2
    it did not keep is still reported (its cross-validated figures), and stage 1's expected hits per million."""
    monkeypatch.setattr(importlib.import_module("scatlas.query.hunt.train"), "prefer_two_stages", lambda m, **_: (False, "stage 1 alone is as good (test)"))
    out = run_cli("hunt", "train", "--index", str(world["root"] / "index"), "--cells", str(world["cells"]),
                  "--positive", f"cell_type = '{RARE}'", "--background", "3000", "--no-progress",
                  "--out", str(tmp_path / "clf"))
    clf = HuntClassifier.load(tmp_path / "clf")
    assert clf.stage2 is None
    assert clf.params["stage2_skipped"] == "two_stage='auto' chose stage 1 alone: stage 1 alone is as good (test)"
    dropped = clf.params["stage2_not_kept"]
    assert dropped["recall"] > 0.9 and 0 < dropped["two_stage"]["precision"] <= 1 and dropped["n_genes"] > 0
    assert "stages: stage 1 alone, chosen by --stages auto (stage 1 alone is as good (test))" in out
    assert f"stage 2 not kept ({dropped['n_genes']} genes), cross-validated: precision {dropped['precision']:.3f}" in out
    m = clf.metrics
    assert m["expected_hits_per_million"] >= m["expected_false_hits_per_million"]
    assert f"false hits {m['expected_false_hits_per_million']:.1f}" in out
    assert f"all hits {m['expected_hits_per_million']:.1f}" in out


def test_prefer_two_stages_needs_a_strictly_better_f1():
    def m(two, one):
        return {"two_stage": {"f1": two}, "stage1_alone": {"f1": one}}

    assert prefer_two_stages(m(0.9, 0.8))[0]
    assert not prefer_two_stages(m(0.8, 0.8))[0]  # a tie keeps stage 1, which reads no expression
    assert not prefer_two_stages(m(0.7, 0.8))[0]
    assert "0.700 <= stage 1 alone's 0.800" in prefer_two_stages(m(0.7, 0.8))[1]
    # the rows it compares on are named: the labelled cells stage 2 trains on, not stage 1's with the background
    why = prefer_two_stages({**m(0.7, 0.8), "rows": {"positives": 13, "negatives": 1477}})[1]
    assert "on 13 positives and 1477 negatives of the labelled cells" in why and "atlas background" in why
    with pytest.raises(InputError, match="two_stage must be True, False or 'auto'"):
        train("unused", None, positive_sql="x", two_stage="yes")  # type: ignore[arg-type]


def test_cli_stages_option(world, tmp_path):
    """``hunt train --stages`` (default auto) and the older ``--two-stage``, through the CLI."""
    args = ["hunt", "train", "--index", str(world["root"] / "index"), "--cells",
            str(world["cells"]), "--positive", f"cell_type = '{RARE}'", "--background",
            "3000", "--no-progress"]
    out = run_cli(*args, "--out", str(tmp_path / "auto"))
    assert "two stages, cross-validated" in out and "stages: two, chosen by --stages auto (" in out
    clf = HuntClassifier.load(tmp_path / "auto")
    assert clf.params["two_stage"] == "auto" and clf.stage2 is not None
    m2 = clf.stage2.metrics  # the two-stage line: on the labelled cells stage 2 trains on, stage 1 alone beside it
    rows, two, one = m2["rows"], m2["two_stage"], m2["stage1_alone"]
    line = next(row for row in out.splitlines() if row.startswith("two stages, cross-validated"))
    assert f"on the {rows['positives']} positives and {rows['negatives']} negatives stage 2 trains on" in line
    assert f"precision {two['precision']:.3f}, recall {two['recall']:.3f}" in line
    assert f"(stage 1 alone on the same cells: precision {one['precision']:.3f}, recall {one['recall']:.3f}" in line
    assert f"all hits per million atlas cells {two['expected_hits_per_million']:.1f}" in line
    out = run_cli(*args, "--out", str(tmp_path / "one"), "--stages", "1")
    assert "stages: stage 1 alone (--stages 1)" in out and HuntClassifier.load(tmp_path / "one").stage2 is None
    res = CliRunner().invoke(cli, ["-q", *args, "--out", str(tmp_path / "bad"), "--stages", "1", "--two-stage"])
    assert res.exit_code != 0 and "--two-stage means --stages 2" in res.output


def test_two_stages_recover_the_population_stage_one_alone_misses(world, tmp_path):
    clf, truth = world["clf"], world["truth"]
    assert clf.stage2 is not None and "stage2_skipped" not in clf.params
    assert clf.stage2.batch_standardized and clf.stage2.sd_floor > 0
    m2 = clf.stage2.metrics
    rows = m2["training_rows"]  # the labelled cells hold both classes: the all-negative atlas background stays out
    assert rows["labelled_positives"] == clf.counts["positives_from_cells"] and rows["atlas_background"] == 0
    assert m2["stage1_candidates"]["recall_of_stage2_recalled"] >= 0.98
    assert {"precision", "recall", "expected_hits_per_million"} <= set(m2["two_stage"])
    loaded = HuntClassifier.load(world["root"] / "clf")
    assert loaded.fingerprint() == clf.fingerprint() and loaded.stage2.gene_names == clf.stage2.gene_names
    np.testing.assert_array_equal(loaded.stage2.weights, clf.stage2.weights)

    two = sweep(world["index"], world["root"] / "clf", tmp_path / "two", progress=False)
    one = sweep(world["index"], clf, tmp_path / "one", progress=False, two_stage=False)
    p2, r2 = _quality(two, truth)
    p1, r1 = _quality(one, truth)
    assert p2 >= 0.9 and r2 >= 0.9, (p2, r2)
    assert min(p1, r1) < 0.8, (p1, r1)  # the embedding blurs the population
    assert two.stages.startswith("two stages") and one.stages == "stage 1 only: two_stage=False"
    assert two.n_stage1_passed > two.n_stage2_kept == two.n_hits and one.n_stage2_kept is None
    assert clf.stage2.stage1_cut < clf.threshold and two.n_stage1_passed >= one.n_hits  # candidates: a superset
    assert two.stage1_cutoff == pytest.approx(clf.stage2.stage1_cut) and two.cutoff == clf.stage2.threshold
    hits = pd.read_parquet(two.hits_path)
    np.testing.assert_allclose(hits["probability"], clf.stage2.calibration.apply(hits["score"].to_numpy()), rtol=1e-6)
    recorded = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert recorded["n_stage1_passed"] == two.n_stage1_passed and recorded["n_stage2_kept"] == two.n_hits


def test_an_interrupted_stage_two_resumes_to_identical_hits(world, tmp_path, monkeypatch):
    want = sweep(world["index"], world["clf"], tmp_path / "whole", progress=False, stage2_chunk_size=97)
    real, calls = stage2_tasks.chunk_scores, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("simulated crash in stage 2")
        return real(*args, **kwargs)

    monkeypatch.setattr(stage2_tasks, "chunk_scores", failing)
    with pytest.raises(TaskError, match="stage2-0002 failed: OSError: simulated"):
        sweep(world["index"], world["clf"], tmp_path / "cut", progress=False, stage2_chunk_size=97,
              executor=LocalExecutor())
    state = json.loads((tmp_path / "cut" / "sweep.json").read_text())
    assert len(state["stage2"]["chunks"]) == 2 and not state["complete"]
    stats_files = sorted((tmp_path / "cut" / "stage2").glob("stats_*.npz"))
    assert stats_files and len(stats_files) == len(state["stage2"]["stats"])  # the batches' gene statistics
    stats_files[0].write_bytes(b"damaged")  # recomputed (the same sample) when unreadable
    monkeypatch.setattr(stage2_tasks, "chunk_scores", real)
    got = sweep(world["index"], world["clf"], tmp_path / "cut", progress=False, stage2_chunk_size=97)
    assert got.n_stage2_chunks == want.n_stage2_chunks > 3 and got.n_stage2_chunks_resumed == 2
    assert got.n_shards_resumed == got.n_shards  # stage 1 was not redone either
    a, b = pd.read_parquet(want.hits_path), pd.read_parquet(got.hits_path)
    pd.testing.assert_frame_equal(a, b)
    assert _partials(tmp_path / "whole") == _partials(tmp_path / "cut")


def _partials(out) -> dict[str, tuple[list, list, list]]:
    """The stage-2 partial files of a sweep directory: ids, scores and unit of each (their contents)."""
    found = {}
    for path in sorted((out / stage2_sweep.STAGE2_DIR).glob("[0-9]*.npz")):
        with np.load(path) as z:
            found[path.name] = (z["ids"].tolist(), z["scores"].tolist(), z["meta"].tolist())
    return found


def _direct_stage2(world, candidates: np.ndarray) -> np.ndarray:
    """Stage 2's scores of ``candidates`` computed here, without tasks: each dataset's statistics on its seeded
    sample, then every candidate's features scored with its dataset's."""
    stage, idx = world["clf"].stage2, world["index"]
    store, why = open_index_store(idx)
    assert store is not None, why
    with store:
        ids, scores = [], []
        for got, features, dataset_id in iter_gene_features(store, idx.embedder, candidates, 10_000):
            stats = dataset_gene_stats(store, idx.embedder, dataset_id, stage.batch_sample, stage2_sweep.STATS_SEED,
                                       10_000)
            ids.append(got)
            scores.append(stage.scores(features, stats))
    np.testing.assert_array_equal(np.concatenate(ids), candidates)
    return np.concatenate(scores)


def test_stage_two_as_local_tasks_scores_every_candidate_as_read_directly(world, tmp_path):
    got = sweep(world["index"], world["clf"], tmp_path / "local", progress=False, stage2_chunk_size=150,
                executor=LocalExecutor())
    parts = _partials(tmp_path / "local")
    assert len(parts) == got.n_stage2_chunks > 1 and got.n_stage2_chunks_resumed == 0
    ids = np.concatenate([np.array(p[0], dtype=np.int64) for p in parts.values()])
    scores = np.concatenate([np.array(p[1], dtype=np.float32) for p in parts.values()])
    assert len(ids) == got.n_stage1_passed and np.all(np.diff(ids) > 0)
    np.testing.assert_array_equal(scores, _direct_stage2(world, ids))
    hits = pd.read_parquet(got.hits_path)
    keep = scores >= np.float32(got.cutoff)
    assert sorted(hits["soma_joinid"]) == ids[keep].tolist()
    default = sweep(world["index"], world["clf"], tmp_path / "default", progress=False, stage2_chunk_size=150)
    pd.testing.assert_frame_equal(pd.read_parquet(default.hits_path), hits)


def test_an_index_whose_store_is_gone_sweeps_with_stage_one_and_says_so(world, tmp_path):
    root = world["root"]
    baseline = sweep(world["index"], world["clf"], tmp_path / "s1", progress=False, two_stage=False)
    os.rename(root / "atlas", root / "atlas.moved")
    try:
        s = sweep(world["index"], world["clf"], tmp_path / "nostore", progress=False)
    finally:
        os.rename(root / "atlas.moved", root / "atlas")
    assert s.stages.startswith("stage 1 only") and "not reachable" in s.stages
    assert s.n_stage2_kept is None and s.n_stage1_passed == s.n_hits == baseline.n_hits
    assert s.cutoff == world["clf"].threshold
    pd.testing.assert_frame_equal(pd.read_parquet(s.hits_path), pd.read_parquet(baseline.hits_path))


def test_a_damaged_stage_two_is_refused_and_one_stage_classifiers_load(world, tmp_path):
    clf = world["clf"]
    clf.save(tmp_path / "c")
    np.save(tmp_path / "c" / STAGE2_WEIGHTS_FILE, clf.stage2.weights + 1)
    with pytest.raises(InputError, match="stage2_weights.npy does not match"):
        HuntClassifier.load(tmp_path / "c")
    one = HuntClassifier(clf.weights, clf.bias, clf.threshold, clf.calibration, clf.embedder_fingerprint, "x")
    one.save(tmp_path / "one")
    assert not (tmp_path / "one" / STAGE2_WEIGHTS_FILE).exists()
    assert "stage2" not in json.loads((tmp_path / "one" / "classifier.json").read_text())
    assert HuntClassifier.load(tmp_path / "one").stage2 is None


def test_stage_one_cut_keeps_the_recalled_positives():
    scores = np.arange(100, dtype=np.float64)
    recalled = np.zeros(100, dtype=bool)
    recalled[50:] = True
    cut = stage1_candidate_cut(scores, recalled, recall=0.98)  # may drop 1 of 50
    assert (scores[recalled] >= cut).mean() >= 0.98 and cut > 50
    assert stage1_candidate_cut(scores, recalled, recall=1.0) < 50
    with pytest.raises(InputError):
        stage1_candidate_cut(scores, np.zeros(100, dtype=bool))


def test_batch_standardised_scores_and_records():
    rng = np.random.default_rng(0)
    G = rng.gamma(1.0, 1.0, size=(50, 4))
    G[:, 3] = 0.0  # a gene that does not vary: divided by the floor, not by 0
    stats = GeneStats.of(G)
    floor = stats.floor()
    assert floor == pytest.approx(np.median(stats.sd[:3]))
    w = np.array([0.5, -1.0, 2.0, 3.0], dtype=np.float32)
    kw = dict(weights=w, bias=0.25, threshold=0.0, calibration=Calibration("platt"),
              gene_names=list("abcd"), stage1_cut=-1.0)
    stage = GeneStage(**kw, batch_standardized=True, sd_floor=floor)
    want = (G - stats.mean) / np.maximum(stats.sd, floor) @ w.astype(np.float64) + 0.25
    np.testing.assert_allclose(stage.scores(G, stats), want, rtol=1e-5)
    np.testing.assert_allclose(standardize(G, stats, floor)[:, 3], 0.0)
    with pytest.raises(InputError, match="statistics"):
        stage.scores(G)
    back = GeneStage.from_json(stage.to_json(), stage.weights)
    assert back.batch_standardized and back.sd_floor == floor and back.fingerprint() == stage.fingerprint()
    old = GeneStage(**kw)  # a stage 2 saved before batches: read as it was (no batch fields in record or fingerprint)
    record = old.to_json()
    assert "batch_standardized" not in record
    assert not GeneStage.from_json(record, old.weights).batch_standardized
    assert old.fingerprint() != stage.fingerprint()
    np.testing.assert_allclose(old.scores(G), G @ w.astype(np.float64) + 0.25, rtol=1e-5)


def test_a_labelled_batch_the_atlas_lacks_is_standardised_away(tmp_path):
    """The labelled cells come from a dataset with a strong batch effect (log-scale sd 0.5 per gene) that is not in
    the atlas: both stages still recover the population; stage 1 alone does not."""
    files = write_h5ad_datasets(replace(CONFIG, batch_sigma=0.5), tmp_path / "h5ad")
    idx = _build(tmp_path, files[1:])
    clf = train(idx, files[0], positive=f"cell_type = '{RARE}'", background=3000, progress=False, two_stage=True)
    truth = set(idx.connect().cursor().execute(f"SELECT soma_joinid FROM cells WHERE cell_type = '{RARE}'").df()
                ["soma_joinid"].tolist())
    p2, r2 = _quality(sweep(idx, clf, tmp_path / "two", progress=False), truth)
    p1, r1 = _quality(sweep(idx, clf, tmp_path / "one", progress=False, two_stage=False), truth)
    assert p2 >= 0.9 and r2 >= 0.9, (p2, r2)
    assert min(p1, r1) < 0.8, (p1, r1)


def test_stage_two_runs_as_ray_tasks_to_the_same_hits(world, tmp_path, monkeypatch):
    """On a local 1-CPU Ray cluster, stage 2's chunks run as Ray tasks (each worker reopening the store and the
    index's embedder by path) and give the partial files and hits of the local run."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    want = sweep(world["index"], world["clf"], tmp_path / "local", progress=False, stage2_chunk_size=150)
    submitted: list[str] = []
    real_run = RayExecutor.run

    def spy(self, tasks, on_done, progress=None):
        submitted.extend(t.key for t in tasks)
        return real_run(self, tasks, on_done, progress)

    monkeypatch.setattr(RayExecutor, "run", spy)
    if ray.is_initialized():
        ray.shutdown()
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "SCATLAS_THREADS": "1"}
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env},
             configure_logging=False)
    try:
        got = sweep(world["index"], world["clf"], tmp_path / "ray", progress=False, stage2_chunk_size=150,
                    executor=RayExecutor())
    finally:
        ray.shutdown()
    chunks = [k for k in submitted if k.startswith("stage2-") and not k.startswith("stage2-stats-")]
    assert chunks == [f"stage2-{i:04d}" for i in range(want.n_stage2_chunks)]
    # the batches' gene statistics are Ray tasks too (one per dataset holding candidates), to the same files
    stats_tasks = [k for k in submitted if k.startswith("stage2-stats-")]
    local_stats = sorted(p.name for p in (tmp_path / "local" / "stage2").glob("stats_*.npz"))
    assert len(stats_tasks) == len(local_stats) > 0
    for name in local_stats:
        with np.load(tmp_path / "local" / "stage2" / name) as a, np.load(tmp_path / "ray" / "stage2" / name) as b:
            np.testing.assert_array_equal(a["mean"], b["mean"])
            np.testing.assert_array_equal(a["sd"], b["sd"])
    assert got.n_stage2_chunks == want.n_stage2_chunks > 1 and got.n_hits == want.n_hits
    assert _partials(tmp_path / "ray") == _partials(tmp_path / "local")
    pd.testing.assert_frame_equal(pd.read_parquet(got.hits_path), pd.read_parquet(want.hits_path))
