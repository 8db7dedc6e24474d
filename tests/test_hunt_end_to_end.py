"""The whole hunt on a counts-level synthetic atlas: ingest -> index -> train from labelled counts -> sweep -> report."""

from __future__ import annotations

import anndata
import pandas as pd
import pytest

from scatlas.atlas import ingest
from scatlas.atlas.errors import GeneOverlapError, InputError
from scatlas.atlas.synthetic import RareType, SyntheticAtlasConfig, plan_atlas, write_h5ad_datasets
from scatlas.index import AtlasIndex, BuildConfig, build_index
from scatlas.query.hunt import report, sweep, train

# A 5,000-cell atlas ingested, indexed, trained on and swept once for the module (~20 s on an idle 2-core machine).
pytestmark = pytest.mark.slow

RARE = "Norn cell"
CONFIG = SyntheticAtlasConfig(
    n_cells=5000, n_genes=300, n_datasets=3, n_donors=2, seed=1, non_primary_fraction=0.0,
    rare_types=(RareType(RARE, 0.01, datasets=(0, 2)),),
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hunt_e2e")
    files = write_h5ad_datasets(CONFIG, root / "h5ad")
    ingest(files, root / "atlas", progress=False)
    build_index(
        root / "atlas", root / "index", embedder="pca", fit_sample=5000,
        embedder_options={"n_hvg": 250, "n_components": 30},
        config=BuildConfig(shard_size=2000, eval_queries=100, calibration_cells=200),
    )
    idx = AtlasIndex.open(root / "index")
    clf = train(idx, files[0], positive=f"cell_type == '{RARE}'", background=3000, progress=False,
                out=root / "clf")
    summary = sweep(idx, root / "clf", root / "sweep", progress=False)
    return {"root": root, "files": files, "index": idx, "clf": clf, "summary": summary}


def test_labelled_cells_of_one_dataset_find_the_population_in_every_dataset(world):
    idx, clf, summary = world["index"], world["clf"], world["summary"]
    assert clf.counts["positives_from_cells"] >= 10 and clf.counts["negatives_from_cells"] > 1000
    # the labelled dataset is part of the atlas: its cells (positives and negatives) count once, not again as
    # background
    assert clf.counts["background_duplicates_dropped"] > clf.counts["positives_from_cells"]
    assert clf.params["cells"]["gene_overlap"]["fraction_of_target"] == 1.0
    truth = idx.connect().cursor().execute(
        f"SELECT soma_joinid, dataset_id FROM cells WHERE cell_type = '{RARE}'").df()
    hits = pd.read_parquet(summary.hits_path)
    found = hits["soma_joinid"].isin(truth["soma_joinid"])
    recall = found.sum() / len(truth)
    precision = found.mean()
    assert recall >= 0.9 and precision >= 0.9, (recall, precision)
    # found in dataset 2 too, whose cells were never labelled
    other = truth[truth["dataset_id"] != truth["dataset_id"].min()]
    assert hits["soma_joinid"].isin(other["soma_joinid"]).sum() >= 0.8 * len(other)


def test_report_enrichment_and_de_find_the_planted_population(world, tmp_path):
    res = report(world["summary"].hits_path, world["index"], tmp_path / "rep")
    enr = res.enrichment
    assert res.by == ["cell_type", "donor_id", "dataset_id"] and not res.left_out  # the default breakdown
    for column in ("cell_type", "donor_id", "dataset_id"):
        sub = enr[enr["column"] == column]
        assert sub["n_cells"].sum() == CONFIG.n_cells and sub["n_hits"].sum() == res.n_hits
    assert enr[enr["column"] == "cell_type"].set_index("group").loc[RARE, "fold"] > 10
    by_ds = enr[enr["column"] == "dataset_id"].set_index("group")
    assert by_ds.loc["synth-001", "n_hits"] == 0 and by_ds.loc["synth-001", "qvalue"] < 0.05  # depleted
    assert by_ds.loc["synth-000", "fold"] > 1
    markers = set(plan_atlas(CONFIG).var.index[plan_atlas(CONFIG).markers[RARE]])
    de = res.de
    assert de is not None and res.de_skipped is None
    up = de[(de["qvalue"] < 0.05) & (de["log2fc"] > 1)].head(20)
    assert len(up) >= 10
    assert up["feature_id"].isin(markers).mean() >= 0.7, up[["gene_symbol", "log2fc", "qvalue"]]
    assert (de["n_a"] == res.n_hits).all() and (de["n_b"] == res.n_hits).all()  # matched per dataset
    for name in ("enrichment.csv", "enrichment.png", "scores.png", "de.csv", "report.md", "report.html"):
        assert (tmp_path / "rep" / name).stat().st_size > 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Differential expression" in md and "Top up-regulated" in md and "Top down-regulated" in md
    assert res.de_matching and "matched to the" in res.de_matching and "on dataset_id" in res.de_matching
    assert res.de_matching in md and res.de_matching in (tmp_path / "rep" / "report.html").read_text()


def test_report_skips_de_when_the_store_is_unreachable_and_groups_by_disease(world, tmp_path):
    res = report(world["summary"].hits_path, world["index"], tmp_path / "nostore", atlas=tmp_path / "gone")
    assert res.de is None and "not reachable" in res.de_skipped
    assert "Skipped: the atlas store" in (tmp_path / "nostore" / "report.md").read_text()
    assert not (tmp_path / "nostore" / "de.csv").exists()
    by = report(world["root"] / "sweep", world["index"], tmp_path / "bydisease", by=("disease",), de_group="disease",
                de_method="t-test")
    assert by.de is not None and len(by.de) and by.by == ["disease"] and by.de_matching is None
    assert all(c.startswith("disease: ") for c in by.de["comparison"].unique())


def test_report_without_de_on_request_does_not_warn(world, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="scatlas.query.hunt.report"):
        res = report(world["summary"].hits_path, world["index"], tmp_path / "node", de=False)
    assert res.de is None and "not requested" in res.de_skipped
    assert not [r for r in caplog.records if "differential expression" in r.getMessage()]


def test_training_leaves_the_callers_anndata_alone_and_refuses_poor_gene_overlap(world):
    adata = anndata.read_h5ad(world["files"][0])
    before_obs, before_x = adata.obs.copy(), adata.X.copy()
    clf = train(world["index"], adata, positive=f"cell_type == '{RARE}'", background=500, n_folds=3, progress=False)
    assert clf.counts["positives_from_cells"] >= 10
    pd.testing.assert_frame_equal(adata.obs, before_obs)
    assert (before_x != adata.X).nnz == 0
    with pytest.raises(GeneOverlapError, match="genes"):
        train(world["index"], adata[:, :60].copy(), positive=f"cell_type == '{RARE}'", progress=False)
    with pytest.raises(InputError, match="empty positive set.*Norn"):
        train(world["index"], adata, positive="cell_type == 'Norn'", progress=False)
    with pytest.raises(InputError, match="unknown column"):
        train(world["index"], adata, positive="celltype == 'Norn cell'", progress=False)


def test_the_labelled_cells_found_in_the_atlas_are_marked_among_the_hits(world, tmp_path):
    """The labelled file is an atlas dataset: its positives are atlas cells, which the classifier records and the
    sweep marks (``training_positive``), so the report can say how many hits are not training cells."""
    idx, clf, summary = world["index"], world["clf"], world["summary"]
    labelled = idx.connect().cursor().execute(
        f"SELECT soma_joinid FROM cells WHERE cell_type = '{RARE}' AND dataset_id = 'synth-000'").df()
    assert len(labelled) == clf.counts["positives_from_cells"]
    assert clf.training_ids is not None and set(clf.training_ids) == set(labelled["soma_joinid"])
    assert clf.counts["labelled_positives_in_atlas"] == len(labelled)
    hits = pd.read_parquet(summary.hits_path)
    marked = hits["training_positive"]
    assert marked.dtype == bool and set(hits.loc[marked, "soma_joinid"]) == set(hits["soma_joinid"]) & set(
        labelled["soma_joinid"])
    assert summary.n_training_hits == int(marked.sum()) > 0 and (~marked).sum() > 0  # new finds too
    res = report(summary.hits_path, idx, tmp_path / "rep", de=False)
    assert res.n_training_hits == summary.n_training_hits
    assert f"{res.n_training_hits:,} of the hits are cells the classifier was trained on" in (
        tmp_path / "rep" / "report.md").read_text()


def test_a_classifier_without_recorded_training_cells_loads_and_sweeps_without_the_column(world, tmp_path):
    import dataclasses

    from scatlas.query.hunt.classifier import TRAINING_IDS_FILE, HuntClassifier

    old = dataclasses.replace(world["clf"], training_ids=None)
    old.save(tmp_path / "old")
    assert not (tmp_path / "old" / TRAINING_IDS_FILE).exists()
    assert HuntClassifier.load(tmp_path / "old").training_ids is None
    s = sweep(world["index"], tmp_path / "old", tmp_path / "sweep", progress=False, two_stage=False)
    assert s.n_training_hits is None and "training_positive" not in pd.read_parquet(s.hits_path).columns
    assert report(s.hits_path, world["index"], tmp_path / "rep", de=False).n_training_hits is None
    (world["root"] / "clf" / TRAINING_IDS_FILE).read_bytes()  # the trained one has the file
    import shutil

    shutil.copytree(world["root"] / "clf", tmp_path / "damaged")
    (tmp_path / "damaged" / TRAINING_IDS_FILE).unlink()
    with pytest.raises(InputError, match="training_ids.npy is missing.*retrain"):
        HuntClassifier.load(tmp_path / "damaged")
