"""`scatlas evaluate`: embedders compared on held-out groups (query/evaluate_embedders.py), on a synthetic 3-dataset
atlas with pca and the toy plug-in (tests/plugin_pkg), and on a real 2-dataset atlas (Kang 2018 CTRL / STIM)."""

from __future__ import annotations

import json
from pathlib import Path

import anndata
import numpy as np
import pytest
from click.testing import CliRunner

from scatlas.atlas.errors import InputError, TooFewCellsError
from scatlas.cli import cli
from scatlas.query.evaluate_embedders import EvaluationSettings, batch_mixing, evaluate_embedders
from tests.conftest import run_cli

RATES = ("knn_macro_f1", "knn_unaligned_macro_f1", "heads_macro_f1", "knn_accuracy", "heads_accuracy",
         "batch_mixing", "label_conservation", "hunt_recall", "hunt_precision")
SECONDS = ("fit_seconds_per_1k", "build_seconds_per_1k", "embed_seconds_per_1k", "heads_seconds")


@pytest.fixture(scope="module")
def synthetic_atlas(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evaluate")
    run_cli("synth", "--atlas", str(root / "atlas"), "--cells", "1800", "--genes", "200", "--datasets", "3",
        "--rare", "norn cell=0.016@0,1,2", "--no-progress")
    return root / "atlas"


def test_evaluate_pca_and_a_plugin_on_a_synthetic_atlas(synthetic_atlas, toy, tmp_path):
    out = tmp_path / "eval"
    text = run_cli("evaluate", "--atlas", str(synthetic_atlas), "--embedders", "pca,toy", "--out", str(out),
               "--max-holdouts", "2", "--embedder-option", "pca:n_components=20",
               "--embedder-option", "toy:n_genes=80", "--no-progress")
    assert "kNN F1" in text and "evaluation.json" in text
    payload = json.loads((out / "evaluation.json").read_text())
    settings = payload["settings"]
    assert settings["holdout_key"] == "dataset_id" and len(settings["holdouts"]) == 2
    assert len(settings["eligible_groups"]) == 3 and settings["embedder_options"]["pca"] == {"n_components": 20}
    assert [e["embedder"] for e in payload["embedders"]] == ["pca", "toy"]
    for entry in payload["embedders"]:
        assert entry["embedder_saw_holdout"] is False and entry["n_holdouts"] == 2
        for key in RATES:
            assert entry[key] is None or 0.0 <= entry[key] <= 1.0, (entry["embedder"], key, entry[key])
        for key in SECONDS:
            assert entry[key] is not None and entry[key] >= 0.0, (entry["embedder"], key)
        for h in entry["holdouts"]:
            # the held-out group was neither indexed nor used to fit: every other cell was
            assert h["n_atlas_cells"] + h["n_heldout_cells"] == settings["n_cells"]
            assert h["n_evaluated"] == h["n_heldout_cells"]
            assert h["hunt_types"] or "no cell_type label under 2%" in h["hunt_note"]
        assert any(t["label"] == "norn cell" for h in entry["holdouts"] for t in h["hunt_types"])
    pca, toy_entry = payload["embedders"]
    assert pca["knn_macro_f1"] > 0.8 and pca["heads_macro_f1"] > 0.8 and pca["label_conservation"] > 0.7
    assert pca["hunt_recall"] is not None and pca["batch_mixing"] > 0.3
    assert toy_entry["knn_macro_f1"] > 0.3 and toy_entry["holdouts"][0]["dim"] == 16
    assert (out / "evaluation.png").read_bytes()[:4] == b"\x89PNG"
    page = (out / "evaluation.html").read_text()
    assert "<table>" in page and "toy" in page and "evaluation.png" in page
    assert not (out / "work").exists()  # the per-group indexes are removed


def test_evaluate_refusals(synthetic_atlas, tmp_path):
    with pytest.raises(InputError, match="unknown embedder 'nope'"):
        evaluate_embedders(synthetic_atlas, tmp_path / "a", ["nope"], progress=False)
    with pytest.raises(InputError, match="the holdout column 'batchx' is not a column"):
        evaluate_embedders(synthetic_atlas, tmp_path / "b", ["pca"],
                           settings=EvaluationSettings(holdout_key="batchx"), progress=False)
    with pytest.raises(TooFewCellsError, match="nothing to hold out"):
        evaluate_embedders(synthetic_atlas, tmp_path / "c", ["pca"],
                           settings=EvaluationSettings(min_group_cells=10_000), progress=False)
    result = CliRunner().invoke(cli, ["evaluate", "--atlas", str(synthetic_atlas), "--embedders", "pca", "--out",
                                      str(tmp_path / "d"), "--embedder-option", "scvi:n_latent=5"])
    assert result.exit_code == 2 and "not among --embedders" in result.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists()


def test_batch_mixing_separates_islands_from_mixed_cells():
    class FakeIndex:
        def __init__(self, vectors):
            self._v = vectors

        def vectors(self, ids):
            return self._v[ids]

    rng = np.random.default_rng(0)
    atlas = rng.standard_normal((200, 8)).astype(np.float32)
    mixed = rng.standard_normal((200, 8)).astype(np.float32)
    island = mixed + 50.0 * np.eye(8, dtype=np.float32)[0]
    norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    ids = np.arange(200)
    assert batch_mixing(norm(mixed), FakeIndex(atlas), ids, 15, 200, 0) > 0.85
    assert batch_mixing(norm(island), FakeIndex(atlas), ids, 15, 200, 0) < 0.1


@pytest.mark.slow
def test_evaluate_pca_on_a_real_two_dataset_atlas(shared_raw, tmp_path):
    """Kang 2018 PBMCs split into a CTRL and a STIM dataset (interferon-beta shifts every cell type): each held out
    in turn and labelled from the other."""
    from scatlas.atlas import ingest

    adata = anndata.read_h5ad(shared_raw / "kang2018_ifnb_ctrl_stim_2800.h5ad")
    files = []
    for sample in ("CTRL", "STIM"):
        path = tmp_path / f"kang_{sample.lower()}.h5ad"
        adata[adata.obs["sample"].astype(str) == sample].copy().write_h5ad(path)
        files.append(path)
    ingest(files, tmp_path / "atlas", progress=False)
    out = tmp_path / "eval"
    run_cli("evaluate", "--atlas", str(tmp_path / "atlas"), "--embedders", "pca", "--out", str(out),
        "--max-holdouts", "2", "--no-heads", "--no-progress")  # the heads would double the time
    payload = json.loads((out / "evaluation.json").read_text())
    pca = payload["embedders"][0]
    assert sorted(payload["settings"]["holdouts"]) == ["kang_ctrl", "kang_stim"]
    n_labels = adata.obs["cell_type"].nunique()
    assert pca["knn_macro_f1"] > max(0.5, 5.0 / n_labels)  # chance is about 1/13
    assert pca["heads_macro_f1"] is None and pca["label_conservation"] > 0.5
    assert 0.0 <= pca["batch_mixing"] <= 1.0
    print(json.dumps({k: v for k, v in pca.items() if k != "holdouts"}, indent=1))


def test_the_cli_says_why_a_figure_is_missing() -> None:
    from scatlas.cli_embed import _evaluation_notes

    holdout = {"labels_absent_from_atlas": {"Int1": 12}, "hunt_note": "no cell_type label under 2% of the atlas"}
    payload = {"settings": {"label_key": "cell_type"},
               "embedders": [{"embedder": "pca", "knn_macro_f1": None, "hunt_recall": None,
                              "holdouts": [holdout, dict(holdout)]},
                             {"embedder": "toy", "knn_macro_f1": 0.9, "hunt_recall": 0.8, "holdouts": [{}]}]}
    notes = _evaluation_notes(payload)
    assert len(notes) == 2 and all(n.startswith("pca: ") for n in notes)
    assert "Cell Ontology" in notes[0] and "under 2%" in notes[1]
    # one held-out group with shared labels: the F1 is missing for another reason, not named as this one
    payload["embedders"][0]["holdouts"][1] = {}
    assert not any("label F1" in n for n in _evaluation_notes(payload))
