"""What `hunt train` learns from: atlas positives against the cells labelled otherwise (unlabelled atlas cells may be
positives), and labelled cells that cannot teach anything (no expression, copies, a predicate matching them all)."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scatlas.atlas import ingest
from scatlas.atlas.errors import InputError
from scatlas.atlas.synthetic import RareType, SyntheticAtlasConfig, write_h5ad_datasets
from scatlas.index import AtlasIndex, BuildConfig, build_index
from scatlas.query.hunt import sweep, train

pytestmark = pytest.mark.slow  # one 4,500-cell atlas for the module (~25 s on an idle 2-core machine)

RARE = "Norn cell"
CONFIG = SyntheticAtlasConfig(
    n_cells=6000, n_genes=300, n_datasets=4, n_donors=2, seed=4, non_primary_fraction=0.0,
    rare_types=(RareType(RARE, 0.02, datasets=(0, 1, 2, 3)),),
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Datasets 0 and 1 labelled; dataset 2 ingested without labels (its Norn cells known only to the test);
    dataset 3 not in the atlas."""
    root = tmp_path_factory.mktemp("hunt_inputs")
    files = write_h5ad_datasets(CONFIG, root / "h5ad")
    bare = anndata.read_h5ad(files[2])
    truth = bare.obs["cell_type"].astype(str).to_numpy()
    bare.obs = bare.obs.drop(columns=[c for c in bare.obs.columns if c.startswith("cell_type")])
    bare.write_h5ad(root / "bare.h5ad")
    ingest([files[0], files[1], root / "bare.h5ad"], root / "atlas", progress=False)
    build_index(root / "atlas", root / "index", embedder="pca", fit_sample=4500, label_keys=(),
                embedder_options={"n_hvg": 250, "n_components": 30},
                config=BuildConfig(shard_size=2000, eval_queries=100, calibration_cells=200))
    idx = AtlasIndex.open(root / "index")
    ids = idx.connect().cursor().execute("SELECT soma_joinid FROM cells WHERE dataset_id = 'bare' ORDER BY 1").df()
    return {"root": root, "files": files, "index": idx, "bare_rare": set(ids["soma_joinid"][truth == RARE])}


def test_atlas_positives_are_told_from_the_cells_labelled_otherwise_and_found_where_unlabelled(world, tmp_path):
    idx = world["index"]
    clf = train(idx, positive_sql=f"cell_type = '{RARE}'", out=tmp_path / "clf", progress=False, two_stage=False)
    assert clf.counts["background_from_labelled_otherwise"] == 1
    labelled_others = idx.connect().cursor().execute(
        f"SELECT count(*) FROM cells WHERE cell_type IS NOT NULL AND cell_type <> '{RARE}'").fetchone()[0]
    assert clf.counts["negatives_from_atlas"] <= labelled_others  # no unlabelled cell among the negatives
    assert clf.counts["background_excluded_as_likely_positive"] == 0  # labelled otherwise: never set aside
    # the hits a sweep should return count the atlas cells the predicate matches, found at the recall
    m = clf.metrics
    known = clf.counts["atlas_cells_matching_sql"] / idx.n_cells
    assert known > 0 and m["expected_hits_per_million"] >= 1e6 * known * m["recall"] > 0
    assert clf.atlas_store_id and clf.atlas_store_id == idx.atlas_store_id  # its training ids are this store's
    assert clf.same_atlas_ids("another build", idx.atlas_store_id)
    assert not clf.same_atlas_ids("another build", "another store") and not clf.same_atlas_ids("another build", "")
    hits = pd.read_parquet(sweep(idx, tmp_path / "clf", tmp_path / "sweep", progress=False).hits_path)
    found = set(hits["soma_joinid"][hits["dataset_id"] == "bare"])
    recall = len(found & world["bare_rare"]) / len(world["bare_rare"])
    precision = len(found & world["bare_rare"]) / max(len(found), 1)
    assert recall >= 0.8 and precision >= 0.8, (recall, precision)


def test_a_cell_the_predicate_is_null_for_is_no_negative(world, tmp_path):
    """``cell_type = 'X' AND dataset_id <> 'none'`` is NULL for an unlabelled cell (NULL AND true): its label is
    unknown, so it is no negative; the record says which datasets the negatives come from."""
    idx = world["index"]
    clf = train(idx, positive_sql=f"cell_type = '{RARE}' AND dataset_id <> 'none'", progress=False, two_stage=False)
    labelled_others = idx.connect().cursor().execute(
        f"SELECT count(*) FROM cells WHERE cell_type IS NOT NULL AND cell_type <> '{RARE}'").fetchone()[0]
    assert clf.counts["background_from_labelled_otherwise"] == 1
    assert clf.counts["negatives_from_atlas"] <= labelled_others
    assert clf.counts["background_datasets"] == 2 and clf.counts["atlas_datasets"] == 3


def test_positives_that_all_lack_expression_are_named_as_such(world, tmp_path):
    adata = anndata.read_h5ad(world["files"][3])
    rare = (adata.obs["cell_type"] == RARE).to_numpy()
    X = sp.csr_matrix(adata.X, dtype=np.float32).tolil()
    X[np.flatnonzero(rare)] = 0
    adata.X = X.tocsr()
    with pytest.raises(InputError, match=r"matches \d+ labelled cells, but none of them expresses"):
        train(world["index"], adata, positive=f"cell_type == '{RARE}'", background=300, progress=False)


def test_a_predicate_matching_every_labelled_cell_is_refused(world, caplog):
    """Here the classifier cannot separate them and training is refused; before that, the warning that no labelled
    cell is a negative (where it can separate them, by the labelled cells' batch, the warning is all there is)."""
    with caplog.at_level("WARNING", logger="scatlas.query.hunt.train"), \
            pytest.raises(InputError, match="cannot tell the .* positives from the .* negatives.*rare type"):
        train(world["index"], world["files"][3], positive="1 = 1", background=500, progress=False)
    assert "no labelled cell is left as a negative" in caplog.text


def test_positives_without_expression_and_copies_of_one_cell_are_left_out(world, tmp_path):
    adata = anndata.read_h5ad(world["files"][0])
    rare = np.flatnonzero((adata.obs["cell_type"] == RARE).to_numpy())
    X = sp.csr_matrix(adata.X, dtype=np.float32).tolil()
    X[rare[:3]] = 0  # three positives with no expression at all
    adata.X = X.tocsr()
    copies = adata[[rare[3]] * 4].copy()  # one positive three more times
    copies.obs_names = [f"copy-{i}" for i in range(len(copies))]
    odd = anndata.concat([adata, copies])
    odd.obs_names_make_unique()
    clf = train(world["index"], odd, positive=f"cell_type == '{RARE}'", background=500, progress=False,
                two_stage=False)
    cells = clf.params["cells"]
    assert cells["n_without_expression"] == {"positives": 3, "negatives": 0}
    assert cells["n_repeated_positives"] == 4  # the copies and the original cell's own repeat: one of five kept
    assert clf.counts["positives_from_cells"] == len(rare) - 3 - 0


def test_a_labelled_positive_that_is_an_atlas_positive_counts_once(world, tmp_path):
    """--cells of an ingested dataset with --positive-sql: its positives are atlas positives too; two copies of a
    cell in two folds would score each other."""
    adata = anndata.read_h5ad(world["files"][0])
    n_rare = int((adata.obs["cell_type"] == RARE).sum())
    clf = train(world["index"], adata, positive=f"cell_type = '{RARE}'", positive_sql=f"cell_type = '{RARE}'",
                background=300, progress=False, two_stage=False)
    assert clf.counts["atlas_positive_copies_dropped"] == n_rare
    assert clf.counts["positives_from_cells"] + clf.counts["positives_from_atlas"] == clf.counts[
        "atlas_cells_matching_sql"]  # datasets 0 and 1: each rare cell once
    assert len(clf.training_ids) == clf.counts["atlas_cells_matching_sql"]  # the copies are still training cells


def test_a_background_of_most_of_the_atlas_is_warned_about(world, caplog):
    """The sweep would score mostly its own negatives: the atlas' unlabelled rare cells among them score low by
    construction, which cross-validation cannot show (a tryout found another study's rare cells missed so)."""
    import logging

    n = world["index"].n_cells
    with caplog.at_level(logging.WARNING, logger="scatlas"):
        train(world["index"], world["files"][3], positive=f"cell_type == '{RARE}'", background=n, progress=False,
              two_stage=False)
    assert any("the atlas background holds" in r.getMessage() and "smaller --background" in r.getMessage()
               for r in caplog.records), caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scatlas"):
        train(world["index"], world["files"][3], positive=f"cell_type == '{RARE}'", background=n // 4,
              progress=False, two_stage=False)
    assert not any("the atlas background holds" in r.getMessage() for r in caplog.records), caplog.text
