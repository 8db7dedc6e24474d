"""``hunt report`` refuses what would make a misleading report: hits from a sweep of another index (or of another
version of it, after ``build --update``), and a ``by`` list that names no column."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from scatlas.atlas.errors import InputError
from scatlas.cli import cli
from scatlas.index import AtlasIndex, EmbedderInfo, build_from_source
from scatlas.index.manifest import MANIFEST_FILE
from scatlas.index.versions import commit_version, version_dirname
from scatlas.query.hunt import HuntClassifier, report, sweep
from scatlas.query.hunt.calibration import Calibration
from tests.test_hunt_report import N, _cells
from tests.test_index_helpers import array_source, config

INFO = EmbedderInfo("test", {"fingerprint": "emb-A"}, "emb-A", 8)


def _build(out: Path, shard_size: int = 400) -> Path:
    """The index of :func:`report_world` (its vectors and cells table), recorded as made by embedder ``emb-A``."""
    src = array_source(N, 8, seed=2)
    build_from_source(src, out, config(shard_size=shard_size), cells=_cells(src._ids), embedder_info=INFO)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An index like :func:`report_world`'s (``index``), swept into ``sweep`` with a classifier hitting part of
    it; ``hits``: hits without a sweep summary beside them."""
    root = tmp_path_factory.mktemp("hunt_report_checks")
    index = _build(root / "idx")
    sw = _sweep(AtlasIndex.open(index), root / "sweep")
    hits = root / "loose" / "hits.parquet"
    hits.parent.mkdir()
    shutil.copy(sw / "hits.parquet", hits)
    return {"root": root, "index": index, "sweep": sw, "hits": hits}


def _sweep(idx: AtlasIndex, out: Path) -> Path:
    weights = np.random.default_rng(0).standard_normal(idx.dim).astype(np.float32)
    clf = HuntClassifier(weights, 0.0, 0.5, Calibration("platt", a=1.0, b=0.0), idx.embedder_fingerprint, "test")
    s = sweep(idx, clf, out, progress=False)
    assert s.n_hits > 10 and s.index_version == 1
    return out


def _cli(hits: Path, index: Path, out: Path, *extra: str) -> Any:
    return CliRunner().invoke(cli, ["-q", "hunt", "report", str(hits), "--index", str(index), "--out", str(out),
                                    "--no-de", "--no-progress", *extra])


def test_hits_of_a_sweep_of_this_index_are_reported(world, tmp_path):
    res = _cli(world["sweep"], world["index"], tmp_path / "rep")
    assert res.exit_code == 0, res.output
    res = _cli(world["sweep"] / "hits.parquet", world["index"], tmp_path / "rep2")  # the file: its summary beside it
    assert res.exit_code == 0, res.output
    copy = tmp_path / "copy"  # a copy of the index is the same build
    shutil.copytree(world["index"], copy)
    assert _cli(world["sweep"], copy, tmp_path / "rep3").exit_code == 0


def test_hits_of_a_sweep_of_another_build_are_refused(world, tmp_path):
    """Another build of the same vectors (same embedder, another shard size): refused, nothing written."""
    _build(tmp_path / "other", shard_size=200)
    res = _cli(world["sweep"], tmp_path / "other", tmp_path / "rep")
    assert res.exit_code == 1 and res.output.startswith("Error: the hits in "), res.output
    assert "come from a sweep of another index or another version of this one" in res.output
    assert "never scored as non-hits" in res.output and "--index" in res.output
    assert "scatlas hunt sweep" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "rep").exists()


def test_hits_of_a_sweep_with_another_embedder_are_refused(world, tmp_path):
    sw = tmp_path / "sw"
    shutil.copytree(world["sweep"], sw)
    summary = json.loads((sw / "summary.json").read_text())
    summary.update(index_manifest_id="0123456789abcdef", embedder_fingerprint="emb-other")
    (sw / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(InputError, match=r"a sweep of another index \(the sweep read vectors of embedder emb-other; "):
        report(sw / "hits.parquet", world["index"], tmp_path / "rep", de=False, progress=False)
    assert not (tmp_path / "rep").exists()


def test_hits_of_a_sweep_of_an_earlier_version_are_refused(world, tmp_path):
    """A sweep at version 1, reported after an update made version 2 current (simulated: the version directory and
    the commit of ``current.json``, as ``build --update`` writes them): refused, naming both versions; the
    version directory the sweep read, passed as the index, is accepted."""
    root = tmp_path / "index"
    shutil.copytree(world["index"], root)
    sw = _sweep(AtlasIndex.open(root), tmp_path / "sw")
    assert _cli(sw, root, tmp_path / "ok").exit_code == 0
    v2 = root / version_dirname(2)
    shutil.copytree(world["index"], v2)
    manifest = json.loads((v2 / MANIFEST_FILE).read_text())
    manifest["version"] = 2
    (v2 / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    commit_version(root, 2)
    assert AtlasIndex.open(root).manifest.version == 2
    res = _cli(sw, root, tmp_path / "rep")
    assert res.exit_code == 1 and res.output.startswith("Error:"), res.output
    assert "another version of this one" in res.output and ", version 1;" in res.output
    assert "version 2)" in res.output and not (tmp_path / "rep").exists()
    root_v1 = tmp_path / "v1"  # the build the sweep read, wherever it is, is accepted
    shutil.copytree(world["index"], root_v1)
    assert _cli(sw, root_v1, tmp_path / "rep_v1").exit_code == 0


def test_hits_without_a_sweep_summary_are_not_checked(world, tmp_path):
    frame = pd.read_parquet(world["sweep"] / "hits.parquet")
    res = report(frame, world["index"], tmp_path / "rep", de=False, progress=False)
    assert res.n_hits == len(frame)
    assert report(world["hits"], world["index"], tmp_path / "rep2", de=False, progress=False).n_hits > 0


@pytest.mark.parametrize("by", [",,,", " , ", ","])
def test_cli_by_naming_no_column_is_an_error(world, tmp_path, by):
    res = _cli(world["hits"], world["index"], tmp_path / "rep", "--by", by)
    assert res.exit_code == 1 and res.output.startswith("Error: by (--by) names no column;"), res.output
    assert "cell_type" in res.output and not (tmp_path / "rep").exists()


@pytest.mark.parametrize(("by", "match"), [
    ((), r"by \(--by\) names no column"),
    (["tissue", "  "], r"by \(--by\) holds a blank column name"),
    (["", "tissue"], r"by \(--by\) holds a blank column name"),
    ("tissue", r"by \(--by\) must be a list of column names, not a string"),
])
def test_by_naming_no_column_is_refused(world, tmp_path, by, match):
    with pytest.raises(InputError, match=match):
        report(world["hits"], world["index"], tmp_path / "rep", by=by, de=False, progress=False)
    assert not (tmp_path / "rep").exists()
