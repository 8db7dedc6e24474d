"""A damaged atlas store is one ``Error:`` line (never a traceback) and is never written to; a Ctrl-C that DuckDB
turned into an error of its own is an interrupt (``Interrupted``, exit 130).

Each damaged store is a copy of one small store (two datasets), with one part broken the way a bad copy, a full disk
or a hand edit breaks it: ``cells.duckdb`` missing, empty or cut short, the experiment's arrays missing, ranges in
``store.json`` that are negative, overlapping, or beyond the ids the store handed out or its arrays' shape."""

from __future__ import annotations

import json
import shutil
import signal
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import duckdb
import pytest
from click.testing import CliRunner

from scatlas.atlas import AtlasStore, ingest
from scatlas.atlas.errors import StoreError
from scatlas.atlas.sql import SigintWatch, duckdb_interrupts
from scatlas.atlas.verify import verify_store
from scatlas.cli import cli
from tests.conftest import make_adata


@pytest.fixture(scope="module")
def intact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of two small datasets, a (40 cells) and b (30 cells); tests damage copies of it."""
    root = tmp_path_factory.mktemp("damaged")
    paths = []
    for i, (name, n) in enumerate((("a", 40), ("b", 30))):
        path = root / f"{name}.h5ad"
        make_adata(n_cells=n, n_genes=30, seed=i, prefix=name).write_h5ad(path)
        paths.append(path)
    ingest(paths, root / "atlas", progress=False)
    return root / "atlas"


@pytest.fixture
def copy(intact: Path, tmp_path: Path) -> Path:
    """A fresh copy of the intact store."""
    out = tmp_path / "atlas"
    shutil.copytree(intact, out)
    return out


def _edit_state(atlas: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    state = json.loads((atlas / "store.json").read_text())
    edit(state)
    (atlas / "store.json").write_text(json.dumps(state))


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(size)


def _flip(path: Path) -> None:
    """One byte of the file's second half inverted (DuckDB's block checksum no longer matches)."""
    data = bytearray(path.read_bytes())
    at = min(200_000, len(data) // 2)
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _set(key: str, value: int, dataset: int = 0) -> Callable[[dict[str, Any]], None]:
    def edit(state: dict[str, Any]) -> None:
        state["datasets"][dataset][key] = value
    return edit


def _beyond_arrays(state: dict[str, Any]) -> None:
    """A range past the X array's shape, with the high-water mark moved along (store.json alone looks fine)."""
    state["datasets"][1]["stop"] = 10**9
    state["obs_high_water"] = 10**9


DAMAGE: dict[str, Callable[[Path], None]] = {
    "cells.duckdb missing": lambda a: (a / "cells.duckdb").unlink(),
    "cells.duckdb empty": lambda a: _truncate(a / "cells.duckdb", 0),
    "cells.duckdb cut in its headers": lambda a: _truncate(a / "cells.duckdb", 8_000),
    "cells.duckdb cut after its headers": lambda a: _truncate(a / "cells.duckdb", 20_000),
    "cells.duckdb cut in its data": lambda a: _truncate(a / "cells.duckdb", (a / "cells.duckdb").stat().st_size // 4),
    "cells.duckdb byte flipped": lambda a: _flip(a / "cells.duckdb"),
    "experiment/ms missing": lambda a: shutil.rmtree(a / "experiment" / "ms"),
    "experiment missing": lambda a: shutil.rmtree(a / "experiment"),
    "stop far beyond the ids": lambda a: _edit_state(a, _set("stop", 10**9)),
    "negative start": lambda a: _edit_state(a, _set("start", -5)),
    "start after stop": lambda a: _edit_state(a, _set("start", 50)),
    "overlapping ranges": lambda a: _edit_state(a, _set("start", 20, dataset=1)),
    "range beyond the arrays' shape": lambda a: _edit_state(a, _beyond_arrays),
}
"""Damage that opening the store (or its first read of the arrays) must find, by name."""
FOUND_ON_READ = {"range beyond the arrays' shape", "cells.duckdb cut after its headers", "cells.duckdb cut in its data",
                 "cells.duckdb byte flipped"}
"""Damage found once the arrays are opened (their shape) or DuckDB reads the file: not by ``AtlasStore.open``
itself, which reads no data."""


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args))


def _refused(result: Any, atlas: Path) -> None:
    """One ``Error:`` line naming the damaged store and `scatlas verify`, exit status 1, no traceback."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert "is damaged" in errors[0] and f"scatlas verify --atlas {atlas}" in errors[0], errors[0]
    assert "re-ingest" in errors[0]


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_build_on_a_damaged_store_is_one_error_line(copy: Path, tmp_path: Path, damage: str) -> None:
    DAMAGE[damage](copy)
    _refused(_invoke("build", "--atlas", str(copy), "--index", str(tmp_path / "index"), "--no-progress"), copy)
    assert not (tmp_path / "index" / "manifest.json").exists()


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_datasets_on_a_damaged_store_is_one_error_line(copy: Path, damage: str) -> None:
    """Never a listing of cells that are not there (``1,000,000,997 cells``, negative unused ids)."""
    DAMAGE[damage](copy)
    result = _invoke("datasets", "--atlas", str(copy))
    _refused(result, copy)
    assert "cells" not in result.output.replace(str(copy), "").split("Error:")[0]


@pytest.mark.parametrize("damage", sorted(set(DAMAGE) - FOUND_ON_READ))
def test_opening_a_damaged_store_raises_store_error(copy: Path, damage: str) -> None:
    DAMAGE[damage](copy)
    with pytest.raises(StoreError, match="is damaged"):
        AtlasStore.open(copy)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_verify_reports_the_damage_as_a_problem(copy: Path, damage: str) -> None:
    DAMAGE[damage](copy)
    report = verify_store(copy, progress=False)
    assert not report.ok
    assert not any("scatlas verify" in p for p in report.problems), report.problems  # no pointer to itself
    result = _invoke("verify", "--atlas", str(copy), "--no-progress")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output


def test_the_intact_store_opens_and_verifies(intact: Path) -> None:
    with AtlasStore.open(intact) as store:
        store.check_arrays()
        assert store.n_cells == 70
    assert verify_store(intact, progress=False).ok


@pytest.mark.parametrize("damage", ["cells.duckdb missing", "stop far beyond the ids", "experiment/ms missing"])
def test_remove_from_a_damaged_store_changes_nothing(copy: Path, damage: str) -> None:
    DAMAGE[damage](copy)
    before = {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    result = _invoke("remove", "--atlas", str(copy), "--dataset", "b")
    _refused(result, copy)
    assert "removed" not in result.output
    after = {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.parametrize("command", [["ingest"], ["relabel", "--dataset", "a", "--obs-map", "donor_id=tissue"]])
def test_writers_refuse_a_damaged_store(copy: Path, tmp_path: Path, command: list[str]) -> None:
    DAMAGE["cells.duckdb missing"](copy)
    state = (copy / "store.json").read_bytes()
    if command == ["ingest"]:
        path = tmp_path / "c.h5ad"
        make_adata(n_cells=20, n_genes=30, seed=3, prefix="c").write_h5ad(path)
        args = ["ingest", str(path), "--atlas", str(copy), "--no-progress"]
    else:
        args = [command[0], "--atlas", str(copy), *command[1:]]
    _refused(_invoke(*args), copy)
    assert (copy / "store.json").read_bytes() == state
    assert not (copy / "cells.duckdb").exists()


def test_a_dataset_id_with_control_characters_is_shown_escaped(copy: Path) -> None:
    def edit(state: dict[str, Any]) -> None:
        state["datasets"][0]["dataset_id"] = "evil\x1b[31m"
        state["datasets"][0]["stop"] = 10**9
    _edit_state(copy, edit)
    result = _invoke("datasets", "--atlas", str(copy))
    _refused(result, copy)
    assert "\x1b" not in result.output and "\\x1b" in result.output


# -- a Ctrl-C that DuckDB reported as an error of its own -----------------------------------------------------------


@pytest.fixture
def default_sigint() -> Iterator[None]:
    """Python's own SIGINT handler (KeyboardInterrupt) for the test, and whatever was there afterwards."""
    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def _duckdb_swallows_a_sigint() -> None:
    """What DuckDB does when a Ctrl-C arrives while it calls back into Python (reading a registered Arrow table):
    the KeyboardInterrupt is raised inside DuckDB, which reports an error of its own without it."""
    with suppress(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
    raise duckdb.InvalidInputException("Invalid Input Error: reading the schema of the object registered as "
                                       "'chunk_cells' failed")


def _stored_or_not() -> None:
    """A writer wrapping DuckDB's error in its own, as ingest does (``the cell metadata could not be stored``)."""
    try:
        _duckdb_swallows_a_sigint()
    except duckdb.Error as exc:
        raise StoreError("the cell metadata could not be stored (InvalidInputException); nothing was added") from exc


def test_a_duckdb_error_after_a_sigint_is_a_keyboard_interrupt(default_sigint: None) -> None:
    with pytest.raises(KeyboardInterrupt) as caught, duckdb_interrupts():
        _stored_or_not()
    assert isinstance(caught.value.__cause__, StoreError)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler it replaced, put back


def test_as_a_decorator_too(default_sigint: None) -> None:
    @duckdb_interrupts()
    def operation() -> None:
        _stored_or_not()

    with pytest.raises(KeyboardInterrupt):
        operation()
    with pytest.raises(KeyboardInterrupt):
        operation()  # a second call watches afresh
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_without_a_sigint_errors_go_on_unchanged(default_sigint: None) -> None:
    with pytest.raises(StoreError, match="could not be stored"), duckdb_interrupts():
        try:
            raise duckdb.InvalidInputException("Invalid Input Error: something else")
        except duckdb.Error as exc:
            raise StoreError("the cell metadata could not be stored") from exc


def test_a_sigint_before_the_operation_does_not_count(default_sigint: None) -> None:
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
    with pytest.raises(StoreError), duckdb_interrupts():
        raise StoreError("the cell metadata could not be stored")


def test_an_ignored_sigint_is_not_an_interrupt() -> None:
    """A process started with SIGINT ignored (the CLI then ignores it with a handler that does nothing): the error
    is the error; the do-nothing handler is chained to and put back, SIG_IGN is never installed."""
    calls: list[int] = []

    def ignore(signum: int, frame: Any) -> None:
        calls.append(signum)

    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, ignore)
    try:
        with pytest.raises(duckdb.InvalidInputException), duckdb_interrupts():
            assert signal.getsignal(signal.SIGINT) is not ignore  # watching
            _duckdb_swallows_a_sigint()
        assert calls == [signal.SIGINT]
        assert signal.getsignal(signal.SIGINT) is ignore
    finally:
        signal.signal(signal.SIGINT, before)


def test_over_sig_ign_nothing_is_installed() -> None:
    before = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with duckdb_interrupts():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        watch = SigintWatch().start()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and not watch.received
        watch.stop()
    finally:
        signal.signal(signal.SIGINT, before)


def test_a_handler_installed_meanwhile_is_left_in_place(default_sigint: None) -> None:
    def other(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    with duckdb_interrupts():
        signal.signal(signal.SIGINT, other)
    assert signal.getsignal(signal.SIGINT) is other


def test_ingest_interrupted_inside_duckdb_exits_130(copy: Path, tmp_path: Path, default_sigint: None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end, without timing: the first chunk's DuckDB insert swallows a Ctrl-C and fails; the CLI says
    ``Interrupted`` (exit 130), not that the metadata could not be stored, and the store keeps its datasets."""
    import scatlas.atlas.ingestion as ingestion

    def write_chunk(exp: Any, con: Any, chunk: Any) -> None:
        _duckdb_swallows_a_sigint()

    monkeypatch.setattr(ingestion, "_write_chunk", write_chunk)
    path = tmp_path / "c.h5ad"
    make_adata(n_cells=20, n_genes=30, seed=3, prefix="c").write_h5ad(path)
    datasets = [d.dataset_id for d in AtlasStore.open(copy).datasets]
    result = _invoke("ingest", str(path), "--atlas", str(copy), "--no-progress")
    assert result.exit_code == 130, result.output
    assert "Interrupted" in result.output and "Error:" not in result.output
    assert [d.dataset_id for d in AtlasStore.open(copy).datasets] == datasets
    assert verify_store(copy, progress=False).ok


def test_verify_of_a_store_another_process_holds_says_busy_not_damaged(intact: Path) -> None:
    """An ingest holds cells.duckdb for writing; verify must not call the store damaged (and advise re-ingesting)."""
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('ready', flush=True); "
         "time.sleep(60)", str(intact / "cells.duckdb")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        res = CliRunner().invoke(cli, ["verify", "--atlas", str(intact)])
        assert res.exit_code == 1 and "in use by another process" in res.output, res.output
        assert "it is damaged" not in res.output and "re-ingest" not in res.output and "Traceback" not in res.output
    finally:
        holder.kill()
        holder.wait()
    assert CliRunner().invoke(cli, ["verify", "--atlas", str(intact)]).exit_code == 0


def test_verify_names_the_dataset_whose_values_cannot_be_read(copy: Path) -> None:
    """A damaged X fragment: verify said "the store could not be read back (SOMAError)" without saying where."""
    data = sorted(p for p in (copy / "experiment").rglob("a0.tdb") if "/X/" in str(p))  # values, not the schema
    assert data, "no X data file found"
    for path in data:  # the values garbled (the arrays still open): reading a dataset back fails
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2 :] = bytes(len(raw) - len(raw) // 2)
        path.write_bytes(bytes(raw))
    report = verify_store(copy, progress=False)
    assert not report.ok
    assert any("could not be read back: the expression values (X) of dataset 'a'" in p for p in report.problems), \
        report.problems
