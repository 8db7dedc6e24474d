"""The reference map: fitted at build, stored and checked in the index, placing new cells; annotate's obsm and PNG;
--no-map; a tampered map refused; build --update fits the new version's map."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import anndata
import numpy as np
import pytest
from click.testing import CliRunner

from scatlas.atlas import ingest
from scatlas.atlas.errors import IndexFormatError, InputError
from scatlas.cli import cli
from scatlas.index import AtlasIndex, ReferenceMap, build_index, update_index, verify_index
from scatlas.index.manifest import REFMAP_DIR, read_manifest
from scatlas.index.refmap_model import COORDS_FILE
from scatlas.query import annotate
from scatlas.query.annotate import MAP_OBSM
from tests.conftest import make_adata

EMB = {"n_hvg": 40, "n_components": 8}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 600-cell atlas of three planted types with a map, and a 150-cell query."""
    root = tmp_path_factory.mktemp("refmap")
    make_adata(600, 60, seed=1, prefix="a").write_h5ad(root / "a.h5ad")
    make_adata(150, 60, seed=2, prefix="q").write_h5ad(root / "q.h5ad")
    ingest([root / "a.h5ad"], root / "atlas", progress=False)
    build_index(root / "atlas", root / "index", embedder_options=EMB, progress=False)
    return {"root": root, "index": root / "index", "query": root / "q.h5ad", "atlas": root / "atlas"}


def _span(coords: np.ndarray) -> float:
    return float(np.ptp(coords, axis=0).max())


def test_map_fitted_at_build_and_recorded(world: dict[str, Any]) -> None:
    manifest = read_manifest(world["index"])
    assert manifest.refmap_files is not None
    assert set(manifest.refmap_files) == {f"{REFMAP_DIR}/{n}" for n in
                                          ("ids.npy", "coords.npy", "vectors.f16.npy", "refmap.json")}
    with AtlasIndex.open(world["index"]) as idx:
        refmap = idx.reference_map()
        assert isinstance(refmap, ReferenceMap) and len(refmap) == 600  # fewer cells than the sample: all of them
        assert refmap.coords.shape == (600, 2) and np.isfinite(refmap.coords).all()
        assert refmap.params["manifest_sha256"] == idx.build_id and refmap.params["seed"] == 0
        assert np.array_equal(refmap.ids, np.sort(refmap.ids))
    assert verify_index(world["index"], progress=False).ok


def test_round_trip_and_placement(world: dict[str, Any]) -> None:
    """The sampled cells' own vectors land where the map put them; cells of one type land together; the placement
    of a batch does not depend on what else is in it."""
    with AtlasIndex.open(world["index"]) as idx:
        refmap = idx.reference_map()
        assert refmap is not None
        vectors = idx.vectors(refmap.ids)
        types = idx.cells(refmap.ids, ["cell_type"])["cell_type"].to_numpy()
    xy = refmap.transform(vectors)
    err = np.linalg.norm(xy - refmap.coords, axis=1) / _span(refmap.coords)
    assert np.median(err) < 0.02 and np.quantile(err, 0.9) < 0.1
    assert np.allclose(refmap.transform(vectors[:7]), xy[:7], atol=1e-5)
    assert np.allclose(refmap.transform(vectors[5]), xy[5:6], atol=1e-5)  # one vector (1-d) works
    for t in np.unique(types):  # each type's placed cells sit nearer its own centre than other types' centres
        own = np.median(refmap.coords[types == t], axis=0)
        others = [np.median(refmap.coords[types == u], axis=0) for u in np.unique(types) if u != t]
        d_own = np.linalg.norm(xy[types == t] - own, axis=1)
        d_other = np.min([np.linalg.norm(xy[types == t] - o, axis=1) for o in others], axis=0)
        assert (d_own < d_other).mean() > 0.95
    bad = vectors[:3].copy()
    bad[1, 0] = np.nan
    placed = refmap.transform(bad)
    assert np.isnan(placed[1]).all() and np.isfinite(placed[[0, 2]]).all()
    with pytest.raises(InputError, match="8-d"):
        refmap.transform(np.ones((2, 5), dtype=np.float32))


def test_annotate_places_the_query_and_draws_it(world: dict[str, Any], tmp_path: Path) -> None:
    res = annotate(world["query"], world["index"], progress=False)
    assert res.placement is not None and res.report["map"]["available"]
    assert res.report["map"]["query_cells_placed"] == 150 and res.report["map"]["atlas_sample_cells"] == 600
    written = res.write(tmp_path / "a.h5ad", map_png=tmp_path / "a.umap.png")
    out = anndata.read_h5ad(written["h5ad"])
    assert out.obsm[MAP_OBSM].shape == (150, 2) and np.isfinite(out.obsm[MAP_OBSM]).all()
    assert (tmp_path / "a.umap.png").read_bytes().startswith(b"\x89PNG")
    # the query's cells land among the atlas cells of their predicted type
    with AtlasIndex.open(world["index"]) as idx:
        refmap = idx.reference_map()
        assert refmap is not None
        types = idx.cells(refmap.ids, ["cell_type"])["cell_type"].to_numpy()
    pred = res.predictions["cell_type_pred"].astype(str).to_numpy()
    xy = out.obsm[MAP_OBSM]
    near = [types[np.argmin(np.linalg.norm(refmap.coords - p, axis=1))] for p in xy]
    assert (np.asarray(near) == pred).mean() > 0.9
    # through the command line: obsm and the PNG beside the outputs
    result = CliRunner().invoke(cli, ["-q", "annotate", str(world["query"]), "--index", str(world["index"]),
                                      "--out", str(tmp_path / "cli.h5ad"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli.umap.png").read_bytes().startswith(b"\x89PNG") and "cli.umap.png" in result.output
    assert MAP_OBSM in anndata.read_h5ad(tmp_path / "cli.h5ad").obsm


def test_no_map_then_resume_fits_it(world: dict[str, Any], tmp_path: Path) -> None:
    """build --no-map leaves the index without a map (annotate writes no map, and says nothing of it); rerunning the
    build without --no-map fits it; rerunning again keeps it."""
    index = tmp_path / "nomap"
    result = CliRunner().invoke(cli, ["-q", "build", "--atlas", str(world["atlas"]), "--index", str(index),
                                      "--embedder-option", "n_hvg=40", "--embedder-option", "n_components=8",
                                      "--no-map", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert not (index / REFMAP_DIR).exists() and read_manifest(index).refmap_files is None
    res = annotate(world["query"], index, progress=False)
    assert res.placement is None and res.report["map"] == {"available": False}
    with pytest.raises(InputError, match="no reference map"):
        res.write(tmp_path / "x.h5ad", map_png=tmp_path / "x.png")
    from matplotlib.figure import Figure

    from scatlas.atlas.outputs import PNG_SOFTWARE

    Figure().savefig(tmp_path / "old.umap.png", metadata={"Software": PNG_SOFTWARE})  # an earlier run's map (marked)
    result = CliRunner().invoke(cli, ["-q", "annotate", str(world["query"]), "--index", str(index),
                                      "--out", str(tmp_path / "old.h5ad"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "old.umap.png").exists()  # a stale map is removed, not left beside new predictions
    assert MAP_OBSM not in anndata.read_h5ad(tmp_path / "old.h5ad").obsm
    build_index(world["atlas"], index, embedder_options=EMB, progress=False)
    made = (index / REFMAP_DIR / "refmap.json").stat().st_mtime_ns
    with AtlasIndex.open(index) as idx:
        assert idx.reference_map() is not None
    build_index(world["atlas"], index, embedder_options=EMB, progress=False)
    assert (index / REFMAP_DIR / "refmap.json").stat().st_mtime_ns == made  # kept, not fitted again


def test_tiny_atlas_gets_no_map(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_adata(40, 60, seed=3, prefix="t").write_h5ad(tmp_path / "t.h5ad")
    ingest([tmp_path / "t.h5ad"], tmp_path / "atlas", progress=False)
    with caplog.at_level(logging.INFO, logger="scatlas.index.refmap"):
        build_index(tmp_path / "atlas", tmp_path / "index", embedder_options={"n_hvg": 40, "n_components": 5},
                    label_keys=(), progress=False)
    assert "no reference map" in caplog.text
    with AtlasIndex.open(tmp_path / "index") as idx:
        assert idx.reference_map() is None


def _copy_index(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_tampered_map_is_refused(world: dict[str, Any], tmp_path: Path) -> None:
    index = _copy_index(world["index"], tmp_path / "idx")
    path = index / REFMAP_DIR / COORDS_FILE
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # same size, other content
    path.write_bytes(bytes(data))
    with AtlasIndex.open(index) as idx, pytest.raises(IndexFormatError, match="SHA-256"):
        idx.reference_map()
    report = verify_index(index, progress=False)
    assert not report.ok and any(p.file == f"{REFMAP_DIR}/{COORDS_FILE}" for p in report.problems)
    result = CliRunner().invoke(cli, ["-q", "annotate", str(world["query"]), "--index", str(index),
                                      "--out", str(tmp_path / "q.h5ad"), "--no-progress"])
    assert result.exit_code == 1 and "Error:" in result.output and "refmap" in result.output
    assert not (tmp_path / "q.h5ad").exists()


def test_a_map_holding_a_pickle_runs_no_code(world: dict[str, Any], tmp_path: Path) -> None:
    """Even with the manifest rewritten to match, a map file holding a pickle is refused, never unpickled."""
    from scatlas.index.manifest import record_refmap_files
    from scatlas.index.shard import file_record

    index = _copy_index(world["index"], tmp_path / "idx")
    marker = tmp_path / "ran"
    np.save(index / REFMAP_DIR / COORDS_FILE, np.array([_Boom(str(marker))], dtype=object), allow_pickle=True)
    records = dict(read_manifest(index).refmap_files or {})
    records[f"{REFMAP_DIR}/{COORDS_FILE}"] = file_record(index / REFMAP_DIR / COORDS_FILE)
    record_refmap_files(index, records)
    with AtlasIndex.open(index) as idx, pytest.raises(IndexFormatError, match="unreadable array"):
        idx.reference_map()
    assert not marker.exists()


class _Boom:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_unrecorded_map_is_not_used(world: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A refmap/ the manifest does not record (an interrupted write, or copied in) is ignored, with a warning."""
    index = _copy_index(world["index"], tmp_path / "idx")
    raw = json.loads((index / "manifest.json").read_text())
    raw["refmap_files"] = None
    (index / "manifest.json").write_text(json.dumps(raw))
    with caplog.at_level(logging.WARNING), AtlasIndex.open(index) as idx:
        assert idx.reference_map() is None
    assert "not recorded" in caplog.text
    assert any("refmap/" in n for n in verify_index(index, progress=False).notes)


def test_update_fits_the_new_versions_map(world: dict[str, Any], tmp_path: Path) -> None:
    atlas = tmp_path / "atlas"
    make_adata(300, 60, seed=1, prefix="u").write_h5ad(tmp_path / "u1.h5ad")
    make_adata(200, 60, seed=4, prefix="v").write_h5ad(tmp_path / "u2.h5ad")
    ingest([tmp_path / "u1.h5ad"], atlas, progress=False)
    build_index(atlas, tmp_path / "index", embedder_options=EMB, progress=False)
    ingest([tmp_path / "u2.h5ad"], atlas, progress=False)
    report = update_index(atlas, tmp_path / "index", progress=False)
    assert report.version == 2
    with AtlasIndex.open(tmp_path / "index") as idx:
        refmap = idx.reference_map()
        assert refmap is not None and len(refmap) == 500 and refmap.params["manifest_sha256"] == idx.build_id
    assert verify_index(tmp_path / "index", progress=False).ok


def test_ctrl_c_swallowed_inside_umap_still_stops_the_fit(world: dict[str, Any], monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """numba's compiled callbacks print "Exception ignored" for a KeyboardInterrupt raised in them and go on; a
    Ctrl-C during UMAP's layout must still stop the fit (KeyboardInterrupt after it returns) and write no map."""
    import os
    import signal

    import umap

    from scatlas.index.refmap import fit_reference_map

    def swallowing_fit(self: Any, x: np.ndarray, *args: Any, **kwargs: Any) -> np.ndarray:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the signal is handled between bytecodes
                pass
        except KeyboardInterrupt:
            pass  # what the numba callback does with it
        return np.zeros((len(x), 2), dtype=np.float32)

    before = read_manifest(world["index"]).refmap_files
    coords = (world["index"] / REFMAP_DIR / COORDS_FILE).read_bytes()
    monkeypatch.setattr(umap.UMAP, "fit_transform", swallowing_fit)
    # Python's own Ctrl-C handler, as in a terminal (a test run started in the background ignores SIGINT)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            fit_reference_map(world["index"], n_cells=200)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler put back
    finally:
        signal.signal(signal.SIGINT, outer)
    assert read_manifest(world["index"]).refmap_files == before
    assert (world["index"] / REFMAP_DIR / COORDS_FILE).read_bytes() == coords
