"""``hunt report`` outputs: arguments checked before anything is written, the report moved into place only when
complete (a failure leaves the output directory as it was), and hits that are not cells of the index left out of
the whole report."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from scatlas.atlas.errors import InputError
from scatlas.cli import cli
from scatlas.query.hunt import report
from tests.test_hunt_report import report_world

report_module = importlib.import_module("scatlas.query.hunt.report")  # `scatlas.query.hunt.report` is the function
FILES = ("enrichment.csv", "enrichment.png", "scores.png", "report.md", "report.html")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return report_world(tmp_path_factory.mktemp("hunt_report_outputs"))


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _no_leftovers(parent: Path) -> None:
    """No temporary directory or file is left in ``parent`` (the output marker aside)."""
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".") and p.name != ".scatlas-output.json"]


def _cli(world: dict[str, Any], out: Path, *extra: str) -> Any:
    return CliRunner().invoke(cli, ["-q", "hunt", "report", str(world["hits"]), "--index", str(world["index"]),
                                    "--out", str(out), "--no-progress", *extra])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"de_group": "nosuch"}, r"de_group \(--de\) 'nosuch' is not a column of the cells table.*dataset_id"),
    ({"de_group": "dataset_id", "de_reference": "nosuch"},
     r"de_reference \(--de-reference\) 'nosuch' is not a 'dataset_id' value among the hits \(they hold \d+: the "
     r"hits table's column lists them\)"),
    ({"de_reference": "normal"}, r"de_reference \(--de-reference\) needs de_group \(--de\)"),
    ({"by": ("tissue", "nosuch")}, r"by \(--by\): 'nosuch' is not a column of the cells table"),
])
def test_bad_arguments_leave_no_output_and_an_earlier_report_untouched(world, tmp_path, kwargs, match):
    with pytest.raises(InputError, match=match):
        report(world["hits"], world["index"], tmp_path / "a" / "rep", progress=False, **kwargs)
    assert not (tmp_path / "a").exists()
    report(world["hits"], world["index"], tmp_path / "old", de=False, progress=False)
    before = _snapshot(tmp_path / "old")
    with pytest.raises(InputError, match=match):
        report(world["hits"], world["index"], tmp_path / "old", progress=False, **kwargs)
    assert _snapshot(tmp_path / "old") == before
    _no_leftovers(tmp_path)


@pytest.mark.parametrize(("extra", "match"), [
    (("--de", "nosuch"), "de_group (--de) 'nosuch' is not a column"),
    (("--de", "dataset_id", "--de-reference", "nosuch"), "de_reference (--de-reference) 'nosuch'"),
    (("--by", "nosuch"), "by (--by): 'nosuch' is not a column"),
])
def test_cli_refuses_bad_options_with_an_error_and_writes_nothing(world, tmp_path, extra, match):
    res = _cli(world, tmp_path / "rep", *extra)
    assert res.exit_code != 0
    assert res.output.startswith("Error:") and match in res.output, res.output
    assert not (tmp_path / "rep").exists()
    _no_leftovers(tmp_path)


def test_a_valid_run_writes_the_report_in_place_and_a_rerun_replaces_it(world, tmp_path):
    out = tmp_path / "new" / "rep"
    res = report(world["hits"], world["index"], out, de=False, progress=False)
    assert res.out_dir == str(out) and res.n_hits == len(world["hit_ids"]) and res.n_dropped == 0
    for name in FILES:
        assert (out / name).stat().st_size > 0
    assert (out / ".scatlas-output.json").is_file()
    assert all(Path(p).parent == out for p in res.files.values())
    assert "left out of this report" not in (out / "report.md").read_text()
    mask = os.umask(0o022)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask  # as any directory a command makes, not mkdtemp's 0700
    _no_leftovers(out.parent)
    # a rerun over it replaces it: the scores plot of the earlier hits goes, as this run's hits have no score
    frame = pd.read_parquet(world["hits"]).drop(columns="score")
    res = report(frame, world["index"], out, de=False, progress=False)
    assert "scores_png" not in res.files and not (out / "scores.png").exists()
    assert (out / "report.md").is_file() and (out / "enrichment.csv").is_file()
    _no_leftovers(out.parent)
    _no_leftovers(out)


def test_cli_valid_run_still_writes_every_file(world, tmp_path):
    res = _cli(world, tmp_path / "rep", "--no-de")
    assert res.exit_code == 0, res.output
    for name in FILES:
        assert (tmp_path / "rep" / name).is_file()


class _FakeStore:
    """An atlas store holding the cells ``start <= id < stop`` (enough for the report's checks)."""

    def __init__(self, start: int, stop: int) -> None:
        self.path = Path("fake-atlas")
        self.closed = False
        self._records = [SimpleNamespace(start=start, stop=stop)]

    def cell_ranges_records(self) -> list[Any]:
        return self._records

    def close(self) -> None:
        self.closed = True


def test_a_failure_in_differential_expression_leaves_the_output_as_it_was(world, tmp_path, monkeypatch):
    store = _FakeStore(int(world["ids"].min()), int(world["ids"].max()) + 1)
    monkeypatch.setattr(report_module, "_open_store", lambda idx, atlas: (store, None))

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise InputError("1 requested cell ids are not in the atlas store")

    monkeypatch.setattr(report_module, "differential_expression", boom)
    with pytest.raises(InputError, match="not in the atlas store"):
        report(world["hits"], world["index"], tmp_path / "a" / "b" / "rep", progress=False)
    assert store.closed and not (tmp_path / "a").exists()  # nor the parent directories made for it
    report(world["hits"], world["index"], tmp_path / "old", de=False, progress=False)
    before = _snapshot(tmp_path / "old")
    with pytest.raises(InputError, match="not in the atlas store"):
        report(world["hits"], world["index"], tmp_path / "old", progress=False)
    assert _snapshot(tmp_path / "old") == before
    _no_leftovers(tmp_path)


def test_cells_of_the_index_missing_from_the_store_fail_before_de_reads_anything(world, tmp_path, monkeypatch):
    hits = np.sort(world["hit_ids"])
    store = _FakeStore(int(hits[1]), int(world["ids"].max()) + 1)  # the first hit is not in the store
    monkeypatch.setattr(report_module, "_open_store", lambda idx, atlas: (store, None))
    monkeypatch.setattr(report_module, "differential_expression", pytest.fail)
    with pytest.raises(InputError, match=r"cells of the index but not of the atlas store fake-atlas.*"
                                         r"`scatlas build --update`.*`scatlas hunt sweep`.*--no-de"):
        report(world["hits"], world["index"], tmp_path / "rep", progress=False)
    assert store.closed and not (tmp_path / "rep").exists()
    _no_leftovers(tmp_path)


def test_hits_that_are_not_cells_of_the_index_are_left_out_everywhere(world, tmp_path, caplog):
    gone = int(world["ids"].max()) + np.arange(1, 4)  # from a sweep of an earlier atlas
    frame = pd.DataFrame({"soma_joinid": np.concatenate([world["hit_ids"], gone]),
                          "score": np.concatenate([np.ones(len(world["hit_ids"])), [99.0] * 3])})
    with caplog.at_level("WARNING", logger="scatlas.query.hunt"):
        res = report(frame, world["index"], tmp_path / "rep", de=False, progress=False)
    assert res.n_hits == len(world["hit_ids"]) and res.n_dropped == 3
    warned = [r.getMessage() for r in caplog.records if "not cells of the index" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(f"3 of the {len(frame)} hits")
    assert "left out of the whole report" in warned[0] and "scatlas hunt sweep" in warned[0]
    assert not [r for r in caplog.records if "they are ignored" in r.getMessage()]  # no second, vaguer warning
    enr = pd.read_csv(tmp_path / "rep" / "enrichment.csv")
    assert (enr.groupby("column")["n_hits"].sum() == len(world["hit_ids"])).all()
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "3 hits are left out of this report" in md and "scatlas hunt sweep" in md
    assert res.summary()["n_dropped"] == 3


def test_hits_none_of_which_is_a_cell_of_the_index_fail_up_front(world, tmp_path):
    frame = pd.DataFrame({"soma_joinid": int(world["ids"].max()) + np.arange(1, 6)})
    with pytest.raises(InputError, match=r"none of the 5 hits is a cell of this index.*re-run `scatlas hunt sweep`"):
        report(frame, world["index"], tmp_path / "rep", progress=False)
    assert not (tmp_path / "rep").exists()


def test_hits_without_usable_scores_are_reported_without_a_scores_plot(world, tmp_path, caplog):
    import logging

    frame = pd.read_parquet(world["hits"]).assign(score=float("nan"))
    with caplog.at_level(logging.WARNING):
        res = report(frame, world["index"], tmp_path / "rep", de=False, progress=False)
    assert "scores_png" not in res.files and not (tmp_path / "rep" / "scores.png").exists()
    assert any("scores are all missing" in r.getMessage() for r in caplog.records)
    assert res.n_hits == len(world["hit_ids"])
