"""Index integrity: damaged, copied or deleted files are detected (open, first read, heads, verify_index)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import scatlas.index.verify as verify_mod
from scatlas.atlas import ingest
from scatlas.atlas.errors import IndexFormatError, InputError
from scatlas.index import AtlasIndex, build_index
from scatlas.index.heads_training import train_label_heads
from scatlas.index.label_heads import HEADS_DIR, HEADS_FILE, load_label_heads
from scatlas.index.manifest import manifest_digest
from scatlas.index.verify import VERIFY_ON_READ_ENV, verify_index
from scatlas.query import annotate
from scatlas.query.hunt import HuntClassifier, sweep
from scatlas.query.hunt.calibration import Calibration
from tests.conftest import make_adata

SHARD0, SHARD1 = "shards/0000", "shards/0001"
VECTORS, IDS, FAISS = "vectors.f16.npy", "ids.npy", "index.faiss"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small PCA index of 500 cells in two equal shards, with label heads (built once, copied per test)."""
    root = tmp_path_factory.mktemp("integrity")
    a, b = make_adata(300, 60, seed=1, prefix="a"), make_adata(200, 60, seed=2, prefix="b")
    a.obs["dataset_id"], b.obs["dataset_id"] = "A", "B"
    a.write_h5ad(root / "a.h5ad")
    b.write_h5ad(root / "b.h5ad")
    ingest([root / "a.h5ad", root / "b.h5ad"], root / "atlas", progress=False)
    build_index(root / "atlas", root / "index", shard_size=250, label_keys=["cell_type"],
                embedder_options={"n_hvg": 40, "n_components": 8}, progress=False)
    return {"atlas": root / "atlas", "index": root / "index"}


@pytest.fixture
def index_copy(pristine: dict[str, Path], tmp_path: Path) -> Path:
    """A fresh copy of the pristine index, free to damage."""
    return Path(shutil.copytree(pristine["index"], tmp_path / "index"))


@pytest.fixture(autouse=True)
def default_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(VERIFY_ON_READ_ENV, raising=False)


def flip(path: Path, offset: int | None = None, n: int = 2) -> None:
    """Invert ``n`` bytes of ``path`` at ``offset`` (default: the middle): same size, other content."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    for i in range(at, at + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def queries(n: int = 5, d: int = 8) -> np.ndarray:
    return np.random.default_rng(3).standard_normal((n, d)).astype(np.float32)


def problem_files(index: Path) -> dict[str, str]:
    report = verify_index(index, progress=False)
    assert report.ok == (not report.problems)
    return {p.file: p.what for p in report.problems}


def test_a_clean_index_records_its_small_files_and_verifies(pristine: dict[str, Path]) -> None:
    raw = json.loads((pristine["index"] / "manifest.json").read_text())
    assert {"build.json", "embedder/embedder.json", "embedder/pca.npz"} <= set(raw["files"])
    assert {"heads/heads.json", "heads/000.npz", "heads/training_sample.npz"} <= set(raw["heads_files"])
    heads_meta = json.loads((pristine["index"] / HEADS_DIR / HEADS_FILE).read_text())
    assert heads_meta["manifest_sha256"] == manifest_digest(pristine["index"])  # recording heads kept the digest
    report = verify_index(pristine["index"], progress=False)
    assert report.ok and not report.problems and not report.notes
    assert report.files_checked >= 12 and report.bytes_checked > 0
    with AtlasIndex.open(pristine["index"], verify=True) as idx:
        assert set(idx.label_heads()) == {"cell_type"}
        assert idx.search(queries(), k=3).ids.shape == (5, 3)


def test_flipped_vector_bytes_fail_search_sweep_and_verify(index_copy: Path, tmp_path: Path) -> None:
    flip(index_copy / SHARD1 / VECTORS)
    idx = AtlasIndex.open(index_copy)  # the cheap checks pass: sizes and id ranges are intact
    with pytest.raises(IndexFormatError, match=r"0001/vectors\.f16\.npy fails its SHA-256 check.*scatlas verify"):
        idx.search(queries(), k=3)
    with pytest.raises(IndexFormatError, match="SHA-256"):
        list(AtlasIndex.open(index_copy).iter_shards())
    fp = idx.manifest.embedder.fingerprint
    clf = HuntClassifier(np.ones(8, dtype=np.float32), -0.1, 0.5, Calibration("platt", a=1.0, b=0.0), fp, "test")
    with pytest.raises(IndexFormatError, match="SHA-256"):
        sweep(index_copy, clf, tmp_path / "sweep", progress=False)
    problems = problem_files(index_copy)
    assert list(problems) == [f"{SHARD1}/{VECTORS}"] and "SHA-256" in problems[f"{SHARD1}/{VECTORS}"]


@pytest.mark.parametrize("name", [IDS, FAISS])
def test_flipped_ids_or_faiss_bytes_are_detected(index_copy: Path, name: str) -> None:
    flip(index_copy / SHARD0 / name)
    idx = AtlasIndex.open(index_copy)
    with pytest.raises(IndexFormatError, match=rf"0000/{name.replace('.', '[.]')} fails its SHA-256 check"):
        idx.search(queries(), k=3)
    assert f"{SHARD0}/{name}" in problem_files(index_copy)


def test_a_shard_copied_over_another_is_refused_at_open(index_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.rmtree(index_copy / SHARD1)
    shutil.copytree(index_copy / SHARD0, index_copy / SHARD1)  # same sizes: only the ids tell them apart
    monkeypatch.setenv(VERIFY_ON_READ_ENV, "0")  # caught without any checksum
    with pytest.raises(IndexFormatError, match="manifest records shard 1 as 250 ids from 250 to 499.*copied"):
        AtlasIndex.open(index_copy)
    problems = problem_files(index_copy)
    assert "copied" in problems[f"{SHARD1}/{IDS}"]
    assert {f"{SHARD1}/{name}" for name in (IDS, VECTORS, FAISS)} <= set(problems)


def test_a_modified_embedder_file_fails_open_cleanly(index_copy: Path) -> None:
    flip(index_copy / "embedder" / "pca.npz", offset=40)
    with pytest.raises(IndexFormatError, match=r"embedder/pca\.npz fails its SHA-256 check.*rebuild"):
        AtlasIndex.open(index_copy)
    (index_copy / "build.json").write_text("{}")
    (index_copy / "embedder" / "pca.npz").unlink()
    with pytest.raises(IndexFormatError, match=r"build\.json has \d+ bytes where the manifest records"):
        AtlasIndex.open(index_copy)
    problems = problem_files(index_copy)
    assert problems["embedder/pca.npz"] == "is missing" and "build.json" in problems


def _drop_integrity_records(index: Path) -> None:
    """Rewrite the manifest as a build from before integrity records would have written it."""
    path = index / "manifest.json"
    raw = json.loads(path.read_text())
    del raw["files"], raw["heads_files"]
    path.write_text(json.dumps(raw, indent=2, sort_keys=True))


def test_old_manifests_open_with_a_note_and_a_garbled_embedder_is_a_clean_error(
    index_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _drop_integrity_records(index_copy)
    (index_copy / "embedder" / "pca.npz").write_bytes(b"PK\x03\x04 not really a zip file" * 10)
    with caplog.at_level(logging.WARNING, logger="scatlas.index"):
        idx = AtlasIndex.open(index_copy)
    assert "predates integrity records" in caplog.text
    with pytest.raises(IndexFormatError, match=r"embedder.*cannot be loaded.*pca\.npz.*damaged"):
        _ = idx.embedder
    report = verify_index(index_copy, progress=False)
    assert report.ok and any("predates integrity records" in n for n in report.notes)


def test_deleted_heads_are_an_error_not_a_silent_vote(index_copy: Path) -> None:
    shutil.rmtree(index_copy / HEADS_DIR)
    q = make_adata(20, 60, seed=7, prefix="q")
    with pytest.raises(IndexFormatError, match=r"heads is missing but the index manifest records label heads.*--label-key"):
        annotate(q, index_copy, progress=False)
    res = annotate(q, index_copy, predictor="knn", progress=False)  # the vote, asked for, reads no heads
    assert res.report["params"]["predicted_by"] == {"cell_type": "knn"}
    assert "heads/heads.json" in problem_files(index_copy)


def test_damaged_heads_are_a_clean_error_and_retraining_repairs_them(
    index_copy: Path, pristine: dict[str, Path]
) -> None:
    npz = index_copy / HEADS_DIR / "000.npz"
    flip(npz, offset=100)
    q = make_adata(20, 60, seed=7, prefix="q")
    with pytest.raises(IndexFormatError, match=r"000\.npz fails its SHA-256 check.*retrain the label heads"):
        annotate(q, index_copy, progress=False)
    assert "heads/000.npz" in problem_files(index_copy)
    # without the manifest's records (heads not recorded), the damaged file itself is still a clean error
    fp = AtlasIndex.open(index_copy).manifest.embedder.fingerprint
    npz.write_bytes(b"PK\x03\x04" + b"\x00" * 200)
    with pytest.raises(IndexFormatError, match="label head 'cell_type'.*unreadable"):
        load_label_heads(index_copy, embedder_fingerprint=fp)
    # the same build settings retrain heads whose files are damaged (instead of keeping them as trained)
    keys = json.loads((index_copy / HEADS_DIR / HEADS_FILE).read_text())["config"]["label_keys"]
    train_label_heads(pristine["atlas"], index_copy, keys, progress=False)
    assert verify_index(index_copy, progress=False).ok
    res = annotate(q, index_copy, progress=False)
    assert res.report["params"]["predicted_by"] == {"cell_type": "heads"}


def test_over_the_limit_shards_are_not_checksummed_on_read_but_it_is_logged(
    index_copy: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    flip(index_copy / SHARD1 / VECTORS)
    monkeypatch.setattr(verify_mod, "VERIFY_ON_READ_MAX_BYTES", 1)
    with caplog.at_level(logging.INFO, logger="scatlas.index"):
        idx = AtlasIndex.open(index_copy)
    assert "not checksummed when read" in caplog.text and "scatlas verify" in caplog.text
    assert idx.search(queries(), k=3).ids.shape == (5, 3)  # the damage goes unnoticed, as announced
    assert len(list(idx.iter_shards())) == 2
    with pytest.raises(IndexFormatError, match="SHA-256"):
        AtlasIndex.open(index_copy, verify=True)  # an explicit check still reads everything
    monkeypatch.setenv(VERIFY_ON_READ_ENV, str(10 << 30))  # the environment overrides the module setting
    with pytest.raises(IndexFormatError, match="SHA-256"):
        AtlasIndex.open(index_copy).search(queries(), k=3)
    monkeypatch.setenv(VERIFY_ON_READ_ENV, "lots")
    with pytest.raises(InputError, match=VERIFY_ON_READ_ENV):
        AtlasIndex.open(index_copy)


def test_verify_index_raises_only_for_what_is_not_an_index(tmp_path: Path, index_copy: Path) -> None:
    with pytest.raises(IndexFormatError, match="does not exist"):
        verify_index(tmp_path / "nothing", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(IndexFormatError, match="not a scatlas index"):
        verify_index(tmp_path / "empty", progress=False)
    (index_copy / "manifest.json").write_text("{ damaged")
    report = verify_index(index_copy, progress=False)
    assert not report.ok and report.problems[0].file == "manifest.json"
    d: dict[str, Any] = report.to_dict()
    assert d["problems"][0]["file"] == "manifest.json" and "rebuild" in str(report.problems[0])


def test_verify_command_reports_intact_and_damaged(pristine: dict[str, Path], index_copy: Path) -> None:
    from click.testing import CliRunner

    from scatlas.cli import cli

    runner = CliRunner()
    ok = runner.invoke(cli, ["verify", "--index", str(index_copy), "--atlas", str(pristine["atlas"]), "--no-progress"])
    assert ok.exit_code == 0, ok.output
    assert "index" in ok.output and "atlas" in ok.output and ok.output.count("intact") == 2
    flip(index_copy / SHARD1 / VECTORS)
    bad = runner.invoke(cli, ["verify", "--index", str(index_copy), "--no-progress", "--json"])
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    assert "Error: the index failed verification" in bad.output
    payload = json.loads(bad.stdout)
    assert payload["index"]["ok"] is False
    assert any(p.startswith(f"{SHARD1}/{VECTORS}") for p in payload["index"]["problems"])
    usage = runner.invoke(cli, ["verify"])
    assert usage.exit_code == 2 and "--index DIR and/or --atlas DIR" in usage.output
