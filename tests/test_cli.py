"""The command line: every command has help; errors print `Error: ...` without a traceback and exit non-zero."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from scatlas.cli import cli


def _all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, cmd in group.commands.items():
        out.append((*prefix, name))
        if isinstance(cmd, click.Group):
            out.extend(_all_commands(cmd, (*prefix, name)))
    return out


def test_top_level_help_lists_commands():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in cli.commands:
        assert name in result.output


@pytest.mark.parametrize("command", _all_commands(cli), ids=lambda c: " ".join(c))
def test_every_command_has_help(command):
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    cmd = cli
    for part in command:
        cmd = cmd.commands[part]  # type: ignore[attr-defined]
    assert cmd.help, f"`scatlas {' '.join(command)}` has no help text"


def test_ingest_cli_success_and_report(tmp_path, h5ad_factory):
    path = h5ad_factory("cli_ds")
    report = tmp_path / "report.json"
    result = CliRunner().invoke(
        cli, ["ingest", str(path), "--atlas", str(tmp_path / "atlas"), "--no-progress", "--report", str(report)]
    )
    assert result.exit_code == 0, result.output
    assert "cli_ds: 120 cells" in result.output
    assert report.is_file()


def test_ingest_cli_errors_are_clean(tmp_path, h5ad_factory):
    runner = CliRunner()
    result = runner.invoke(cli, ["ingest", str(tmp_path / "missing.h5ad"), "--atlas", str(tmp_path / "atlas")])
    assert result.exit_code != 0
    assert "Error: " in result.output and "no such file" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(
        cli, ["ingest", str(h5ad_factory("x")), "--atlas", str(tmp_path / "a"), "--obs-map", "nonsense"]
    )
    assert result.exit_code != 0 and "SOURCE=TARGET" in result.output


def test_console_script_runs_as_subprocess(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "scatlas", "ingest", str(tmp_path / "nope.h5ad"), "--atlas", str(tmp_path / "a")],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: ")
    assert "Traceback" not in proc.stderr


def test_import_has_no_side_effects():
    code = "import logging, atlas, index, query, scatlas.cli; print(len(logging.getLogger().handlers))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "0" and proc.stderr == ""


def test_synth_writes_files_and_ingests(tmp_path):
    runner = CliRunner()
    out = tmp_path / "files"
    result = runner.invoke(cli, ["synth", "--out", str(out), "--cells", "600", "--genes", "200", "--datasets", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.h5ad")) == ["synth-000.h5ad", "synth-001.h5ad"]
    result = runner.invoke(
        cli,
        ["synth", "--atlas", str(tmp_path / "atlas"), "--cells", "600", "--genes", "200", "--datasets", "2",
         "--rare", "norn=0.05", "--absent", "B cell=0", "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    from scatlas.atlas import AtlasStore

    store = AtlasStore.open(tmp_path / "atlas")
    assert len(store.datasets) == 2
    with store.connect() as con:
        assert con.execute("SELECT count(*) FROM cells WHERE cell_type = 'norn'").fetchone()[0] > 0
        b_cells = con.execute("SELECT count(*) FROM cells WHERE cell_type = 'B cell' AND dataset_id = 'synth-000'").fetchone()[0]
    assert b_cells == 0
    assert not list(tmp_path.glob(".scatlas-synth-*"))  # temporary files removed


@pytest.mark.parametrize(
    "args, message",
    [
        (["synth", "--cells", "10"], "exactly one of"),
        (["synth", "--out", "x", "--rare", "norn"], "NAME=VALUE"),
        (["synth", "--out", "x", "--absent", "B cell=a"], "TYPE=I,J"),
    ],
)
def test_synth_bad_arguments(tmp_path, args, message):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0
    assert message in result.output


def _library_functions() -> dict[tuple[str, ...], object]:
    from scatlas.atlas import ingest
    from scatlas.index import build_index
    from scatlas.query import annotate
    from scatlas.query.hunt import report, sweep, train

    return {
        ("ingest",): ingest, ("build",): build_index, ("annotate",): annotate,
        ("hunt", "train"): train, ("hunt", "sweep"): sweep, ("hunt", "report"): report,
    }


@pytest.mark.parametrize("command", list(_library_functions()), ids=lambda c: " ".join(c))
def test_cli_defaults_are_the_librarys(command):
    """A command is a thin wrapper: an option it shares (by name) with the library function must default to the
    same value, or to None (meaning: the library decides), so the CLI and Python users get the same run."""
    import inspect

    fn = _library_functions()[command]
    params = inspect.signature(fn).parameters  # type: ignore[arg-type]
    cmd = cli
    for part in command:
        cmd = cmd.commands[part]  # type: ignore[attr-defined]
    compared = 0
    for p in cmd.params:  # type: ignore[attr-defined]
        lib = params.get(p.name or "")
        if lib is None or lib.default is inspect.Parameter.empty or p.default is None or p.multiple or p.is_flag:
            continue
        if p.name == "executor":  # a name here, the executor object it makes there
            continue
        compared += 1
        default = p.default
        if isinstance(lib.default, tuple) and isinstance(default, str):  # "a,b,c" on the command line
            default = tuple(default.split(","))
        assert default == lib.default, (
            f"`scatlas {' '.join(command)} --{p.name.replace('_', '-')}` defaults to {p.default!r}, "
            f"{fn.__name__}() to {lib.default!r}"  # type: ignore[attr-defined]
        )
    assert compared


def test_cli_refuses_an_annotate_output_that_is_not_h5ad_and_a_probability_cut_of_0_or_1(tmp_path):
    from click.testing import CliRunner

    from scatlas.cli import cli

    q = tmp_path / "q.h5ad"
    q.write_bytes(b"")
    (tmp_path / "idx").mkdir()
    res = CliRunner().invoke(cli, ["annotate", str(q), "--index", str(tmp_path / "idx"), "--out", str(tmp_path / "a.csv")])
    assert res.exit_code == 2 and "ending in .h5ad" in res.output and not (tmp_path / "a.csv").exists()
    for cut in ("0", "1"):
        res = CliRunner().invoke(cli, ["hunt", "sweep", "--index", str(tmp_path / "idx"), "--classifier",
                                       str(tmp_path / "c"), "--out", str(tmp_path / "s"), "--min-probability", cut])
        assert res.exit_code == 2 and "--min-probability" in res.output


def test_a_ctrl_c_while_the_command_starts_is_an_interrupt(monkeypatch, capsys):
    """A Ctrl-C while the command's modules load ends with exit status 130 and a line, not an import traceback."""
    from scatlas import entry

    class Loading:
        def __getattr__(self, name):
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "scatlas.cli", Loading())
    with pytest.raises(SystemExit) as exc:
        entry.main()
    assert exc.value.code == 130 and "Interrupted" in capsys.readouterr().err
