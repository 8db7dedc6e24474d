"""Commands write only where they may, and every failure reads ``Error: ...`` (no traceback).

One tiny atlas store, index, classifier and sweep are made once for the module through the command line; each test
then points a command at a path it must not write (an input, another command's output, the current directory) or
makes a write fail, and checks the message and that nothing was changed.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner, Result

from scatlas.atlas.errors import InputError
from scatlas.cli import cli

POSITIVE = "cell_type == 'norn cell'"


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, ["-q", *args])


def ok(*args: str) -> str:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result.output


def refused(*args: str, match: str) -> str:
    """Run a command that must fail cleanly: exit status 1, ``Error: ...`` containing ``match``, no traceback."""
    result = invoke(*args)
    text = result.output
    assert result.exit_code == 1, text
    assert "Error: " in text and "Traceback" not in text, text
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert match in text, text
    return text


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path) with the SHA-256 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("safety")
    ok("synth", "--out", str(root / "h5ad"), "--cells", "1500", "--genes", "200", "--datasets", "3",
       "--rare", "norn cell=0.05@0,1,2", "--no-progress")
    files = sorted((root / "h5ad").glob("*.h5ad"))
    ok("ingest", str(files[0]), str(files[1]), "--atlas", str(root / "atlas"), "--no-progress")
    ok("build", "--atlas", str(root / "atlas"), "--index", str(root / "index"), "--shard-size", "400",
       "--embedder-option", "n_components=16", "--fit-sample", "1000", "--no-label-heads", "--no-progress")
    ok("hunt", "train", "--index", str(root / "index"), "--cells", str(files[2]), "--positive", POSITIVE,
       "--out", str(root / "clf"), "--background", "300", "--no-progress")
    ok("hunt", "sweep", "--index", str(root / "index"), "--classifier", str(root / "clf"), "--out", str(root / "sweep"),
       "--no-progress")
    return {"root": root, "atlas": root / "atlas", "index": root / "index", "query": files[2], "clf": root / "clf",
            "sweep": root / "sweep"}


def train_args(world: dict[str, Path], out: Path | str) -> list[str]:
    return ["hunt", "train", "--index", str(world["index"]), "--cells", str(world["query"]), "--positive", POSITIVE,
            "--out", str(out), "--background", "300", "--no-progress"]


# -- refusing paths ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["atlas", "index"])
def test_train_refuses_to_replace_a_store_or_an_index(world, target):
    before = snapshot(world[target])
    text = refused(*train_args(world, world[target]), match=str(world[target]))
    assert "not empty" in text or "input" in text
    assert snapshot(world[target]) == before


def test_train_refuses_the_current_directory(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    refused(*train_args(world, "."), match="current directory")
    (tmp_path / "notes.txt").write_text("keep me")
    refused(*train_args(world, "."), match="current directory")
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_train_refuses_a_directory_inside_the_index(world):
    before = snapshot(world["index"])
    refused(*train_args(world, world["index"] / "clf"), match="inside the input")
    assert snapshot(world["index"]) == before


def test_a_classifier_directory_is_replaced_by_a_new_classifier(world, tmp_path):
    out = tmp_path / "clf"
    ok(*train_args(world, out)[:-1], "--two-stage", "--no-progress")
    first = json.loads((out / "classifier.json").read_text())
    two = sorted(p.name for p in out.iterdir())
    ok(*train_args(world, out)[:-1], "--seed", "3", "--no-progress")
    second = json.loads((out / "classifier.json").read_text())
    assert second["seed"] == 3 and first["seed"] == 0
    # a one-stage classifier replaces a two-stage one whole: no stale stage-2 file is left
    assert sorted(p.name for p in out.iterdir()) == ["classifier.json", "training_ids.npy", "weights.npy"]
    assert set(two) <= {"classifier.json", "stage2_weights.npy", "training_ids.npy", "weights.npy"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left behind


@pytest.mark.parametrize("option", ["--report", "--neighbors", "--out"])
def test_annotate_refuses_to_write_over_its_query(world, tmp_path, option):
    query = tmp_path / "q.h5ad"
    shutil.copyfile(world["query"], query)
    before = snapshot(tmp_path)
    args = {"--out": str(tmp_path / "a.h5ad"), option: str(query)}
    flat = [x for kv in args.items() for x in kv]
    refused("annotate", str(query), "--index", str(world["index"]), *flat, "--no-progress", match=str(query))
    assert snapshot(tmp_path) == before


def test_annotate_refuses_outputs_inside_the_index_or_a_foreign_file(world, tmp_path):
    before = snapshot(world["index"])
    refused("annotate", str(world["query"]), "--index", str(world["index"]), "--out", str(world["index"] / "a.h5ad"),
            "--no-progress", match="inside the input")
    assert snapshot(world["index"]) == before
    notes = tmp_path / "notes.json"
    notes.write_text("not json at all")
    refused("annotate", str(world["query"]), "--index", str(world["index"]), "--out", str(tmp_path / "a.h5ad"),
            "--report", str(notes), "--no-progress", match="not a json file")
    assert notes.read_text() == "not json at all"


def test_sweep_and_report_refuse_foreign_directories(world, tmp_path, monkeypatch):
    before = snapshot(world["index"])
    refused("hunt", "sweep", "--index", str(world["index"]), "--classifier", str(world["clf"]), "--out",
            str(world["index"]), "--no-progress", match="input")
    assert snapshot(world["index"]) == before
    (tmp_path / "notes.txt").write_text("keep me")
    monkeypatch.chdir(tmp_path)
    refused("hunt", "sweep", "--index", str(world["index"]), "--classifier", str(world["clf"]), "--out", ".",
            "--no-progress", match="current directory")
    refused("hunt", "report", str(world["sweep"] / "hits.parquet"), "--index", str(world["index"]), "--out",
            str(world["sweep"]), "--no-de", match="input")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_demo_refuses_a_directory_that_is_not_a_demo(tmp_path):
    out = tmp_path / "work"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    refused("demo", "--out", str(out), "--cells", "2000", "--no-progress", match="not empty")
    assert (out / "thesis.tex").read_text() == "years of work"


def test_demo_replaces_an_earlier_demo(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    out.mkdir()
    (out / ".scatlas-output.json").write_text(json.dumps({"kind": "demo"}))
    (out / "query.confusion.png").write_bytes(b"old")

    def stop(*args, **kwargs):
        raise InputError("stopped after preparing the directory")

    monkeypatch.setattr("scatlas.atlas.synthetic.write_h5ad_datasets", stop)
    refused("demo", "--out", str(out), "--cells", "2000", "--no-progress", match="stopped after preparing")
    assert sorted(p.name for p in out.iterdir()) == [".scatlas-output.json"]


def test_ingest_refuses_a_directory_that_is_not_a_store(world, tmp_path):
    before = snapshot(world["index"])
    refused("ingest", str(world["query"]), "--atlas", str(world["index"]), "--no-progress", match="scatlas index")
    assert snapshot(world["index"]) == before


# -- failed writes and reads -------------------------------------------------------------------------------------


def test_disk_full_while_annotating_is_an_error_not_a_traceback(world, tmp_path, monkeypatch):
    def full(source, *args, **kwargs):  # as shutil.copyfile fails: the error carries the source's name
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(source))

    monkeypatch.setattr("scatlas.query.outputs.shutil.copyfile", full)
    text = refused("annotate", str(world["query"]), "--index", str(world["index"]), "--out", str(tmp_path / "a.h5ad"),
                   "--no-progress", match="No space left on device")
    assert "free space" in text and str(tmp_path / "a.h5ad") in text and str(world["query"]) not in text
    assert not list(tmp_path.iterdir())


def test_disk_full_in_a_report_is_an_error(world, tmp_path, monkeypatch):
    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    text = refused("hunt", "report", str(world["sweep"]), "--index", str(world["index"]), "--out",
                   str(tmp_path / "rep"), "--no-de", match="No space left on device")
    assert "enrichment.csv" in text and "free space" in text


def test_read_only_target_in_a_sweep_is_an_error(world, tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(np, "savez", read_only)  # the sweep's per-shard partial files
    text = refused("hunt", "sweep", "--index", str(world["index"]), "--classifier", str(world["clf"]), "--out",
                   str(tmp_path / "sw"), "--no-progress", match="Read-only file system")
    assert "write somewhere else" in text


def test_os_errors_from_any_command_are_mapped_by_the_cli(world, tmp_path, monkeypatch):
    def failing(*args, **kwargs):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "store" / "x"))

    monkeypatch.setattr("scatlas.atlas.ingestion.ingest", failing)
    text = refused("ingest", str(world["query"]), "--atlas", str(tmp_path / "store"), match="Permission denied")
    assert str(tmp_path / "store" / "x") in text and "permissions" in text

    def tiledb_full(*args, **kwargs):  # a library's own exception reporting a full disk
        raise RuntimeError("[TileDB::IO] Error: Cannot write to file; No space left on device")

    monkeypatch.setattr("scatlas.atlas.ingestion.ingest", tiledb_full)
    refused("ingest", str(world["query"]), "--atlas", str(tmp_path / "store"), match="No space left on device")

    class SOMAError(Exception):  # tiledbsoma's own, for a store directory another user owns
        pass

    def tiledb_denied(*args, **kwargs):
        raise SOMAError(f"[TileDB::VFS] Error: Cannot open file '{tmp_path}/store/experiment/obs/__schema/x'; "
                        "Permission denied")

    monkeypatch.setattr("scatlas.atlas.ingestion.ingest", tiledb_denied)
    text = refused("ingest", str(world["query"]), "--atlas", str(tmp_path / "store"), match="Permission denied")
    assert "while accessing" in text and "obs/__schema" in text and "permissions" in text


def test_a_locked_cells_table_is_reported_as_in_use(world, tmp_path):
    index = tmp_path / "index"
    shutil.copytree(world["index"], index)
    code = "import duckdb, sys; con = duckdb.connect(sys.argv[1]); print('ready', flush=True); sys.stdin.readline()"
    holder = subprocess.Popen([sys.executable, "-c", code, str(index / "cells.duckdb")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        refused("hunt", "report", str(world["sweep"]), "--index", str(index), "--out", str(tmp_path / "rep"),
                "--no-de", match="in use by another process")
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait()


def test_a_damaged_classifier_is_named_and_its_text_not_echoed(world, tmp_path):
    clf = tmp_path / "clf"
    shutil.copytree(world["clf"], clf)
    (clf / "classifier.json").write_text("SECRET-CONTENT {")
    text = refused("hunt", "sweep", "--index", str(world["index"]), "--classifier", str(clf), "--out",
                   str(tmp_path / "sw"), "--no-progress", match="is damaged")
    assert "scatlas hunt train" in text and "SECRET-CONTENT" not in text
    meta = json.loads((world["clf"] / "classifier.json").read_text())
    del meta["bias"]
    (clf / "classifier.json").write_text(json.dumps(meta))
    refused("hunt", "sweep", "--index", str(world["index"]), "--classifier", str(clf), "--out", str(tmp_path / "sw"),
            "--no-progress", match="lacks the field 'bias'")
    (clf / "weights.npy").write_bytes(b"SECRET-CONTENT")
    refused("hunt", "sweep", "--index", str(world["index"]), "--classifier", str(clf), "--out", str(tmp_path / "sw"),
            "--no-progress", match="weights.npy")
    # a damaged classifier directory may be replaced by retraining
    ok(*train_args(world, clf))


def test_report_on_a_file_that_is_not_parquet(world, tmp_path):
    bogus = tmp_path / "hits.parquet"
    bogus.write_text("SECRET-CONTENT")
    text = refused("hunt", "report", str(bogus), "--index", str(world["index"]), "--out", str(tmp_path / "rep"),
                   "--no-de", match="not a hits Parquet file written by `scatlas hunt sweep`")
    assert "SECRET-CONTENT" not in text
    refused("hunt", "report", str(world["query"]), "--index", str(world["index"]), "--out", str(tmp_path / "rep"),
            "--no-de", match="not a hits Parquet file")


def test_a_second_sweep_into_the_same_directory_is_refused(world, tmp_path):
    out = tmp_path / "sw"
    shutil.copytree(world["sweep"], out)
    before = snapshot(out)
    with open(out / ".sweep.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another sweep holds the directory
        refused("hunt", "sweep", "--index", str(world["index"]), "--classifier", str(world["clf"]), "--out", str(out),
                "--restart", "--no-progress", match="another sweep is writing to")
    assert snapshot(out) == before
    text = ok("hunt", "sweep", "--index", str(world["index"]), "--classifier", str(world["clf"]), "--out", str(out),
              "--restart", "--no-progress")
    n_rows = len(pd.read_parquet(out / "hits.parquet"))
    assert f": {n_rows:,} hits" in text
    assert json.loads((out / "summary.json").read_text())["n_hits"] == n_rows


# -- outputs of an earlier run, and file names -------------------------------------------------------------------


def test_annotating_again_removes_the_earlier_confusion_matrix(world, tmp_path):
    out = tmp_path / "a.h5ad"
    ok("annotate", str(world["query"]), "--index", str(world["index"]), "--out", str(out), "--truth-key", "cell_type",
       "--no-progress")
    assert (tmp_path / "a.confusion.png").is_file()
    ok("annotate", str(world["query"]), "--index", str(world["index"]), "--out", str(out), "--no-progress")
    assert not (tmp_path / "a.confusion.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5ad", "a.neighbors.parquet", "a.report.json",
                                                          "a.umap.png"]


def test_non_utf8_file_names_work(world, tmp_path):
    query = tmp_path / os.fsdecode(b"q\xff.h5ad")
    shutil.copyfile(world["query"], query)
    out = tmp_path / os.fsdecode(b"out\xfe.h5ad")
    ok("annotate", str(query), "--index", str(world["index"]), "--out", str(out), "--no-progress")
    assert out.is_file() and out.with_name(os.fsdecode(b"out\xfe.neighbors.parquet")).is_file()
    sweep_dir = tmp_path / os.fsdecode(b"sweep\xff")
    ok("hunt", "sweep", "--index", str(world["index"]), "--classifier", str(world["clf"]), "--out", str(sweep_dir),
       "--no-progress")
    ok("hunt", "report", str(sweep_dir), "--index", str(world["index"]), "--out", str(tmp_path / os.fsdecode(b"r\xff")),
       "--no-de")
    text = refused("hunt", "report", str(query), "--index", str(world["index"]), "--out", str(tmp_path / "r2"),
                   "--no-de", match="not a hits Parquet file")
    text.encode("utf-8")  # printable: the undecodable byte is shown as U+FFFD


def test_annotate_never_writes_into_a_store_or_a_sweep_nor_over_a_foreign_h5ad(world, tmp_path):
    """Files of other commands look like annotate's kinds (JSON, Parquet, HDF5): they are refused all the same."""
    before = {k: snapshot(world[k]) for k in ("atlas", "sweep")}
    base = ["annotate", str(world["query"]), "--index", str(world["index"]), "--no-progress"]
    refused(*base, "--out", str(tmp_path / "a.h5ad"), "--report", str(world["atlas"] / "store.json"),
            match="inside an atlas store")
    refused(*base, "--out", str(tmp_path / "b.h5ad"), "--neighbors", str(world["sweep"] / "hits.parquet"),
            match="inside a hunt sweep directory")
    raw = tmp_path / "raw.h5ad"
    shutil.copyfile(world["query"], raw)
    kept = raw.read_bytes()
    refused(*base, "--out", str(raw), match="exists and was not written by scatlas")
    assert raw.read_bytes() == kept
    assert {k: snapshot(world[k]) for k in ("atlas", "sweep")} == before
    ok(*base, "--out", str(tmp_path / "c.h5ad"))
    ok(*base, "--out", str(tmp_path / "c.h5ad"))  # its own earlier output is replaced


def test_replacing_a_directory_that_holds_other_files_is_refused(world, tmp_path):
    """A directory that only looks like an index (a manifest.json) or a demo (h5ad/, atlas/, index/) keeps the
    user's files: --overwrite and demo replace only what they wrote."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "manifest.json").write_text('{"name": "my-web-app"}')
    (proj / "precious.txt").write_text("keep")
    refused("build", "--atlas", str(world["atlas"]), "--index", str(proj), "--overwrite", "--no-label-heads",
            "--no-progress", match="also holds")
    assert (proj / "precious.txt").read_text() == "keep"
    mine = tmp_path / "mine"
    for sub in ("h5ad", "atlas", "index"):
        (mine / sub).mkdir(parents=True)
    (mine / "atlas" / "thesis.tex").write_text("years")
    # no demo's mark: a folder that merely holds those three directories is not taken for one
    refused("demo", "--out", str(mine), "--cells", "2000", "--no-progress", match="not scatlas' mark")
    (mine / "notes.txt").write_text("keep")
    refused("demo", "--out", str(mine), "--cells", "2000", "--no-progress", match="also holds")
    assert (mine / "notes.txt").read_text() == "keep" and (mine / "atlas" / "thesis.tex").read_text() == "years"


def test_paths_through_a_missing_directory_create_no_stray_directory(world, tmp_path):
    """``x/../y`` names ``y``: writing there (a store, a sweep, an annotated file) must not create ``x``."""
    ok("ingest", str(world["query"]), "--atlas", str(tmp_path / "x" / ".." / "store"), "--no-progress")
    ok("hunt", "sweep", "--index", str(world["index"]), "--classifier", str(world["clf"]),
       "--out", str(tmp_path / "y" / ".." / "sweep"), "--no-progress")
    ok("annotate", str(world["query"]), "--index", str(world["index"]), "--label-key", "cell_type",
       "--out", str(tmp_path / "z" / ".." / "q.h5ad"), "--no-progress")
    made = {p.name for p in tmp_path.iterdir()}
    assert not made & {"x", "y", "z"} and {"store", "sweep", "q.h5ad", "q.report.json"} <= made, made


def test_a_users_own_csv_parquet_json_or_png_is_never_replaced(world, tmp_path):
    """Only files scatlas wrote (its mark: Parquet metadata, the first JSON key, the PNG's Software text; a CSV by its
    header) are replaced; a user's file of the same kind at an output path, named or a side file, is refused."""
    query = str(world["query"])
    user_csv = tmp_path / "user.csv"
    user_csv.write_text("precious,data\n1,2\n")
    refused("search", query, "--index", str(world["index"]), "--out", str(user_csv), "--no-progress",
            match="was not written by scatlas")
    assert user_csv.read_text() == "precious,data\n1,2\n"
    # the side files of a search (hits.report.json, hits.enrichment.csv) and of an annotation (q.neighbors.parquet)
    (tmp_path / "hits.report.json").write_text('{"mine": 1}')
    refused("search", query, "--index", str(world["index"]), "--out", str(tmp_path / "hits.csv"), "--no-progress",
            match="hits.report.json exists and was not written by scatlas")
    assert (tmp_path / "hits.report.json").read_text() == '{"mine": 1}'
    pd.DataFrame({"my": [1]}).to_parquet(tmp_path / "q.neighbors.parquet")
    before = (tmp_path / "q.neighbors.parquet").read_bytes()
    refused("annotate", query, "--index", str(world["index"]), "--label-key", "cell_type", "--out",
            str(tmp_path / "q.h5ad"), "--no-progress", match="q.neighbors.parquet exists and was not written")
    assert (tmp_path / "q.neighbors.parquet").read_bytes() == before and not (tmp_path / "q.h5ad").exists()
    (tmp_path / "r.json").write_text('{"mine": 1}')
    refused("datasets", "--atlas", str(world["atlas"]), "--json-out", str(tmp_path / "r.json"),
            match="was not written by scatlas")
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    Figure().savefig(tmp_path / "p.umap.png")  # a user's figure (its Software text is matplotlib's)
    refused("annotate", query, "--index", str(world["index"]), "--label-key", "cell_type", "--out",
            str(tmp_path / "p.h5ad"), "--no-progress", match="p.umap.png exists and was not written")
    # scatlas' own outputs are replaced by a rerun, as before
    (tmp_path / "hits.report.json").unlink()
    for _ in range(2):
        ok("search", query, "--index", str(world["index"]), "--out", str(tmp_path / "hits.csv"), "--no-progress")
    for _ in range(2):
        ok("annotate", query, "--index", str(world["index"]), "--label-key", "cell_type", "--out",
           str(tmp_path / "mine.h5ad"), "--no-progress")
    assert json.loads((tmp_path / "mine.report.json").read_text()).get("scatlas_output") == "report"
    ok("datasets", "--atlas", str(world["atlas"]), "--json-out", str(tmp_path / "d.json"))
    ok("datasets", "--atlas", str(world["atlas"]), "--json-out", str(tmp_path / "d.json"))
