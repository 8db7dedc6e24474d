"""Embedder plug-ins: the ``scatlas.embedders`` entry-point group, lazy loading, clear errors, and a toy plug-in
(tests/plugin_pkg) through build, info, annotate and `scatlas embedders`. (evaluate with it: test_evaluate.py.)"""

from __future__ import annotations

import json
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from click.testing import CliRunner

from scatlas.atlas.embed import registry
from scatlas.atlas.embed.registry import (
    ENTRY_POINT_GROUP,
    available_embedders,
    load_embedder,
    make_embedder,
    registered_embedders,
)
from scatlas.atlas.errors import DependencyError, InputError
from scatlas.cli import cli
from tests.conftest import run_cli
from tests.plugin_pkg import install, uninstall

ROOT = Path(__file__).resolve().parents[1]


def test_builtin_embedders_register_in_pyproject_as_in_the_fallback_table():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][ENTRY_POINT_GROUP]
    assert declared == registry._BACKENDS  # one list, two places: the metadata and the fallback without it
    entries = registered_embedders()
    for name, target in declared.items():
        assert entries[name].builtin and entries[name].origin == "scatlas" and entries[name].target == target
    assert {"pca", "precomputed", "uce"} <= set(available_embedders())


def test_the_installed_metadata_declares_them():
    """After `pip install -e .` (make setup reinstalls when pyproject.toml changes) the metadata lists the group."""
    found = [dist for dist in metadata.distributions(name="scatlas")
             if any(ep.group == ENTRY_POINT_GROUP for ep in dist.entry_points)]
    if not found:
        pytest.skip("the installed scatlas metadata predates the scatlas.embedders entry points: run `make setup`")
    points = {ep.name: ep.value for ep in found[0].entry_points if ep.group == ENTRY_POINT_GROUP}
    assert points == registry._BACKENDS


def test_a_plugin_is_listed_without_being_imported(toy):
    assert "toy" in available_embedders() and "scatlas_toy_embedder" not in sys.modules
    entry = registered_embedders()["toy"]
    assert not entry.builtin and entry.origin == "scatlas-toy-embedder 0.1"
    out = run_cli("embedders")
    line = next(ln for ln in out.splitlines() if ln.startswith("toy "))
    assert "scatlas-toy-embedder 0.1" in line and " yes " in line and "random projection" in line
    rows = {r["name"]: r for r in json.loads(run_cli("embedders", "--json"))}
    assert rows["toy"]["usable"] and rows["toy"]["fits"] and rows["pca"]["builtin"]
    embedder = make_embedder("toy", dim=4)
    assert embedder.name == "toy" and embedder.dim == 4 and embedder.requires_fit


def test_a_plugin_builds_annotates_and_is_needed_to_open_its_index(toy, tmp_path, monkeypatch):
    run_cli("synth", "--out", str(tmp_path / "h5ad"), "--cells", "900", "--genes", "200", "--datasets", "3",
        "--no-progress")
    files = sorted((tmp_path / "h5ad").glob("*.h5ad"))
    run_cli("ingest", *map(str, files[:2]), "--atlas", str(tmp_path / "atlas"), "--no-progress")
    index = tmp_path / "index"
    out = run_cli("build", "--atlas", str(tmp_path / "atlas"), "--index", str(index), "--embedder", "toy",
              "--embedder-option", "n_genes=80", "--no-progress")
    assert "embedder     toy" in out and "16 dims" in out
    assert json.loads(run_cli("info", str(index), "--json"))["embedder"] == "toy"
    out = run_cli("annotate", str(files[2]), "--index", str(index), "--out", str(tmp_path / "q.h5ad"),
              "--truth-key", "cell_type", "--no-progress")
    report = json.loads((tmp_path / "q.report.json").read_text())
    assert report["evaluation"]["cell_type"]["accuracy"] > 0.5, out
    saved = load_embedder(index / "embedder")
    assert saved.name == "toy" and len(saved.genes) == 80
    # without the plug-in, the index says which embedder it needs instead of failing obscurely
    monkeypatch.undo()
    uninstall()
    with pytest.raises(DependencyError, match="'toy', which is not registered here"):
        load_embedder(index / "embedder")
    result = CliRunner().invoke(cli, ["annotate", str(files[2]), "--index", str(index), "--out",
                                      str(tmp_path / "q2.h5ad")])
    assert result.exit_code == 1 and "not registered" in result.output and "Traceback" not in result.output


BROKEN = {
    "scatlas_broken_embedder": "raise RuntimeError('boom at import')\n",
    "scatlas_misnamed_embedder": (
        "from scatlas_toy_embedder import ToyEmbedder\n\n\nclass Misnamed(ToyEmbedder):\n    name = 'other'\n"),
}


def test_a_broken_plugin_gives_a_clear_error_naming_it(monkeypatch, tmp_path):
    install(monkeypatch, tmp_path / "toy")  # the misnamed plug-in subclasses the toy one
    install(monkeypatch, tmp_path / "broken", dist="scatlas-broken", modules=BROKEN, entry_points={
        "broken": "scatlas_broken_embedder:Broken", "notanembedder": "json:dumps",
        "misnamed": "scatlas_misnamed_embedder:Misnamed"})
    try:
        assert {"broken", "notanembedder", "misnamed", "toy"} <= set(available_embedders())
        assert "scatlas_broken_embedder" not in sys.modules
        with pytest.raises(DependencyError, match=r"plug-in 'broken' \(scatlas_broken_embedder:Broken, from "
                                                  r"scatlas-broken 0.1\) failed to import: RuntimeError: boom"):
            make_embedder("broken")
        with pytest.raises(DependencyError, match="'notanembedder'.*not a subclass of scatlas' Embedder"):
            make_embedder("notanembedder")
        with pytest.raises(DependencyError, match="declares name = 'other'; it must be 'misnamed'"):
            make_embedder("misnamed")
        with pytest.raises(InputError, match="unknown embedder 'nope'; choose one of: .*broken.*pca"):
            make_embedder("nope")
        result = CliRunner().invoke(cli, ["build", "--atlas", str(tmp_path / "no-atlas"), "--index",
                                          str(tmp_path / "i"), "--embedder", "broken"])
        assert result.exit_code == 1 and result.output.startswith("Error: ") and "Traceback" not in result.output
        out = run_cli("embedders")  # the listing still works and says what is wrong
        assert "UNUSABLE" in next(ln for ln in out.splitlines() if ln.startswith("broken "))
        assert "pca" in out and "toy" in out
    finally:
        uninstall("scatlas_broken_embedder", "scatlas_misnamed_embedder")


def test_a_plugin_cannot_take_a_builtin_name(monkeypatch, tmp_path, caplog):
    install(monkeypatch, tmp_path / "p", dist="scatlas-impostor", entry_points={
        "pca": "scatlas_toy_embedder:ToyEmbedder", "Bad:Name": "scatlas_toy_embedder:ToyEmbedder"})
    try:
        with caplog.at_level("WARNING"):
            entries = registered_embedders()
        assert entries["pca"].builtin and entries["pca"].target == registry._BACKENDS["pca"]
        assert "Bad:Name" not in entries
        assert "name is taken by scatlas" in caplog.text
        assert type(make_embedder("pca")).__name__ == "PCAEmbedder"
    finally:
        uninstall()
