"""``scatlas synth`` (and :func:`synthesize`) writes only where it may: a new or empty directory, or one holding its
own earlier output; never into or under an atlas store, index, classifier, sweep or report, never over a file it
did not write. Its ``.h5ad`` files carry scatlas' mark. Any allowed ``--genes`` works."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import anndata
import h5py
import numpy as np
import pytest
from click.testing import CliRunner, Result

from scatlas.atlas import ingest
from scatlas.atlas.errors import InputError, OutputError
from scatlas.atlas.outputs import H5AD_MARK, MARKER_FILE
from scatlas.atlas.synthetic import SyntheticAtlasConfig, SyntheticEmbeddingConfig, synthesize
from scatlas.cli import cli
from scatlas.index import build_index
from tests.conftest import make_adata

SMALL = SyntheticAtlasConfig(n_cells=120, n_genes=300, n_datasets=1, n_donors=2, seed=1)
VECTORS = SyntheticEmbeddingConfig(n=50, d=4, n_clusters=2)


def synth(out: Path | str, *extra: str) -> Result:
    return CliRunner().invoke(
        cli, ["synth", "--out", str(out), "--cells", "120", "--genes", "300", "--datasets", "1", "--no-progress", *extra]
    )


def refused(result: Result, match: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Error: " in result.output and "Traceback" not in result.output, result.output
    assert match in result.output, result.output


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (relative path) with the SHA-256 of each file's bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny atlas store and its index (real ones), and directories marked as a classifier, sweep and report."""
    root = tmp_path_factory.mktemp("synth_outputs")
    files = []
    for i in range(2):
        path = root / f"d{i}.h5ad"
        make_adata(n_cells=150, n_genes=60, seed=i, prefix=f"d{i}_").write_h5ad(path)
        files.append(path)
    ingest(files, root / "atlas", progress=False)
    build_index(root / "atlas", root / "index", embedder_options={"n_components": 8}, label_keys=(),
                reference_map=False, progress=False)
    for kind, name in (("hunt-classifier", "clf"), ("hunt-sweep", "sweep"), ("hunt-report", "report")):
        (root / name).mkdir()
        (root / name / MARKER_FILE).write_text(json.dumps({"kind": kind}))
    (root / "clf" / "classifier.json").write_text("{}")
    (root / "report" / "report.md").write_text("# findings")
    return {"root": root, "atlas": root / "atlas", "index": root / "index", "clf": root / "clf",
            "sweep": root / "sweep", "report": root / "report"}


# -- protected directories ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("target", "what"), [
    ("index", "scatlas index"),
    ("atlas", "atlas store"),
    ("atlas/experiment", "atlas store"),
    ("index/shards", "scatlas index"),
    ("index/new-folder", "scatlas index"),
    ("clf", "hunt classifier"),
    ("clf/sub", "hunt classifier"),
    ("sweep", "hunt sweep"),
    ("sweep/sub", "hunt sweep"),
    ("report", "hunt report"),
    ("report/sub", "hunt report"),
])
def test_synth_refuses_scatlas_outputs_and_what_lies_inside_them(world, target, what):
    before = snapshot(world["root"])
    out = world["root"] / target
    refused(synth(out), what)
    refused(synth(out, "--overwrite"), what)
    refused(synth(out, "--embeddings", "--dim", "4", "--clusters", "2"), what)
    with pytest.raises(OutputError, match=what):
        synthesize(SMALL, out, overwrite=True)
    with pytest.raises(OutputError, match=what):
        synthesize(VECTORS, out, fmt="npy", overwrite=True)
    assert snapshot(world["root"]) == before  # nothing written, no directory created


def test_synth_refuses_a_user_folder_and_a_git_repository(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("years of work")
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (repo / "README.md").write_text("hello")
    for folder in (work, repo):
        before = snapshot(folder)
        refused(synth(folder), "not empty")
        refused(synth(folder, "--overwrite"), "not empty")
        refused(synth(folder, "--embeddings", "--dim", "4", "--clusters", "2", "--overwrite"), "not empty")
        with pytest.raises(OutputError, match="not empty"):
            synthesize(VECTORS, folder, fmt="npy", overwrite=True)
        assert snapshot(folder) == before


def test_synth_refuses_to_replace_a_users_h5ad(tmp_path):
    # a folder of the user's own: their file happens to be named like synth's output
    mine = tmp_path / "mine"
    mine.mkdir()
    make_adata(n_cells=30, n_genes=20).write_h5ad(mine / "synth-000.h5ad")
    before = snapshot(mine)
    refused(synth(mine, "--overwrite"), "not empty")
    assert snapshot(mine) == before

    # synth's own folder, where the user put their file in place of synth's
    out = tmp_path / "out"
    assert synth(out).exit_code == 0
    make_adata(n_cells=30, n_genes=20).write_h5ad(out / "synth-000.h5ad")
    before = snapshot(out)
    refused(synth(out, "--overwrite"), "not written by `scatlas synth`")
    with pytest.raises(OutputError, match="not written by"):
        synthesize(SMALL, out, overwrite=True)
    assert snapshot(out) == before


def test_synth_npy_refuses_to_replace_files_it_did_not_write(tmp_path):
    out = tmp_path / "vec"
    synthesize(VECTORS, out, fmt="npy")
    (out / "labels.npy").write_text("my labels, not a .npy")
    before = snapshot(out)
    with pytest.raises(OutputError, match="not written by"):
        synthesize(VECTORS, out, fmt="npy", overwrite=True)
    refused(synth(out, "--embeddings", "--dim", "4", "--clusters", "2", "--overwrite"), "not written by")
    assert snapshot(out) == before


def test_synth_without_overwrite_still_refuses_existing_files(tmp_path):
    out = tmp_path / "out"
    assert synth(out).exit_code == 0
    before = snapshot(out)
    refused(synth(out), "already exist")
    with pytest.raises(InputError, match="already exist"):
        synthesize(SMALL, out)
    assert snapshot(out) == before


# -- what stays allowed ------------------------------------------------------------------------------------------


def test_synth_writes_new_and_empty_directories_and_marks_its_files(tmp_path):
    new = tmp_path / "a" / "b"
    result = synth(new)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in new.iterdir()) == [MARKER_FILE, "synth-000.h5ad"]
    with h5py.File(new / "synth-000.h5ad", "r") as f:
        assert f.attrs[H5AD_MARK] == "synth"
    assert anndata.read_h5ad(new / "synth-000.h5ad").n_obs == 120
    empty = tmp_path / "empty"
    empty.mkdir()
    assert synth(empty).exit_code == 0
    assert (empty / "synth-000.h5ad").is_file()


def test_synth_reruns_over_its_own_output(tmp_path):
    out = tmp_path / "out"
    first = synthesize(SMALL, out)
    again = synthesize(SMALL, out, overwrite=True)
    assert again == first
    result = synth(out, "--overwrite")
    assert result.exit_code == 0, result.output
    # h5ad and npy outputs may share synth's directory, and each be replaced again
    assert len(synthesize(VECTORS, out, fmt="npy")) == 3
    assert len(synthesize(VECTORS, out, fmt="npy", overwrite=True)) == 3
    assert np.load(out / "vectors.npy").shape == (50, 4)
    # a directory holding only .h5ad files synth wrote (its marker lost) is still synth's
    bare = tmp_path / "bare"
    synthesize(SMALL, bare)
    (bare / MARKER_FILE).unlink()
    assert synthesize(SMALL, bare, overwrite=True) == [bare / "synth-000.h5ad"]
    assert json.loads((bare / MARKER_FILE).read_text()) == {"kind": "synth"}


def test_synth_writes_a_new_folder_inside_a_git_repository(tmp_path):
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    result = synth(repo / "data")
    assert result.exit_code == 0, result.output
    assert (repo / "data" / "synth-000.h5ad").is_file()


# -- the smallest gene count -------------------------------------------------------------------------------------


def test_synth_works_with_the_fewest_genes_the_cli_allows(tmp_path):
    result = CliRunner().invoke(cli, ["synth", "--out", str(tmp_path / "g"), "--cells", "200", "--genes", "50",
                                      "--datasets", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    adata = anndata.read_h5ad(tmp_path / "g" / "synth-000.h5ad")
    assert adata.shape == (200, 50)
    config = SyntheticAtlasConfig(n_genes=50)
    assert max(config.n_markers, config.n_lineage_markers, config.n_rare_markers) <= 17
    assert SyntheticAtlasConfig(n_genes=2000).n_rare_markers == 30  # unchanged where they fit


def test_too_many_explicit_markers_name_the_fewest_genes():
    with pytest.raises(InputError, match="at least 72 genes"):
        SyntheticAtlasConfig(n_genes=50, n_rare_markers=25)


def test_synth_overwrite_with_fewer_datasets_removes_its_own_extra_files_only(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["synth", "--out", str(out), "--cells", "300", "--genes", "300",
                                      "--datasets", "3", "--no-progress"])
    assert result.exit_code == 0, result.output
    mine = out / "synth-009.h5ad"
    make_adata(n_cells=10, n_genes=20, seed=0).write_h5ad(mine)  # a user's file under synth's naming
    result = synth(out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.h5ad")) == ["synth-000.h5ad", "synth-009.h5ad"]
    assert anndata.read_h5ad(mine).n_obs == 10


def test_synth_into_a_store_that_holds_synthetic_datasets_is_refused_before_writing(tmp_path):
    args = ["synth", "--atlas", str(tmp_path / "atlas"), "--cells", "120", "--genes", "300", "--datasets", "1",
            "--no-progress"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    before = snapshot(tmp_path)
    result = CliRunner().invoke(cli, args)
    refused(result, "already holds synthetic dataset(s) synth-000")
    assert "--dataset-id to give" not in result.output
    assert snapshot(tmp_path) == before
