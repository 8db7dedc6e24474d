"""A reader that stops early (``scatlas info INDEX | head -1``) ends the command quietly, as SIGPIPE would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from scatlas.index import build_from_source
from tests.test_index_helpers import array_source, config

ROOT = Path(__file__).resolve().parents[1]


def test_a_closed_stdout_ends_the_command_quietly(tmp_path):
    build_from_source(array_source(1200, 8), tmp_path / "idx", config(shard_size=1000))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "scatlas", "info", str(tmp_path / "idx")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the command writes anything: its first write fails with EPIPE
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err
    assert "Error" not in err and "Traceback" not in err and "Exception ignored" not in err, err


def test_a_command_started_with_sigint_ignored_survives_a_sigint_after_a_tiledb_read(tmp_path, h5ad_factory):
    """A script's background job starts with SIGINT ignored. TileDB's own SIGINT handler (installed on its first
    read) passes the signal on to the handler it replaced, and passed on to SIG_IGN it crashed the process (exit
    139); the CLI replaces SIG_IGN with a handler that does nothing (``cli_common.ignore_sigint_safely``)."""
    import signal

    from scatlas.atlas import ingest

    ingest([h5ad_factory("a", n_cells=60)], tmp_path / "atlas", progress=False)
    script = (
        "import os, signal, sys, time\n"
        "from scatlas.cli_common import ignore_sigint_safely\n"
        "ignore_sigint_safely()\n"
        "from scatlas.atlas.store import AtlasStore\n"
        "store = AtlasStore.open(sys.argv[1])\n"
        "n = sum(len(c.ids) for c in store.iter_chunks(start=0, stop=60, chunk_size=30, with_X=True))\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(0.3)\n"
        "print('read', n, 'and survived')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "atlas")], capture_output=True, text=True,
                          env=env, timeout=300, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert done.returncode == 0 and "read 60 and survived" in done.stdout, (done.returncode, done.stderr[-2000:])


def test_a_ctrl_c_after_the_command_finished_keeps_its_exit_status():
    """A Ctrl-C that lands once the command is done (while Python shuts down) must not turn a success into exit
    status 130: ``cli.main`` ignores SIGINT after the command returns."""
    script = (
        "import os, signal, sys, time\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"  # as in a terminal, even from a background run
        "from scatlas.cli import main\n"
        "sys.argv = ['scatlas', '--help']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(0.3)\n"
        "sys.exit(code)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "Usage:" in done.stdout, (done.returncode, done.stderr[-2000:])


def test_a_manifest_naming_files_outside_the_index_is_refused(tmp_path):
    """A manifest is data too: a recorded file ``../victim.txt`` (or an absolute path) would have verify read, and
    report on, a file outside the index; such a manifest is malformed."""
    import json

    from click.testing import CliRunner

    from scatlas.cli import cli

    build_from_source(array_source(1200, 8), tmp_path / "idx", config(shard_size=1000))
    (tmp_path / "victim.txt").write_text("secret")
    path = tmp_path / "idx" / "manifest.json"
    manifest = json.loads(path.read_text())
    for name in ("../victim.txt", str(tmp_path / "victim.txt")):
        bad = {**manifest, "files": {**(manifest.get("files") or {}), name: {"bytes": 6, "sha256": "0" * 64}}}
        path.write_text(json.dumps(bad))
        res = CliRunner().invoke(cli, ["verify", "--index", str(tmp_path / "idx")])
        assert res.exit_code != 0 and "outside the index" in res.output and "Traceback" not in res.output, res.output
        assert "secret" not in res.output


def test_a_query_tiledb_cancelled_on_a_sigint_is_an_interrupt(tmp_path, monkeypatch):
    """TileDB cancels its running queries on a SIGINT with a handler of its own, even where the process ignores
    SIGINT; the error it then raises is reported as the interrupt it is (exit 130), not a traceback."""
    import importlib

    from click.testing import CliRunner

    from scatlas.cli import cli

    class SOMAError(Exception):
        pass

    def cancelled(*args, **kwargs):
        raise SOMAError("[TileDB::Query] Error: Query cancelled")

    monkeypatch.setattr(importlib.import_module("scatlas.atlas.lifecycle"), "list_datasets", cancelled)
    res = CliRunner().invoke(cli, ["datasets", "--atlas", str(tmp_path)])
    assert res.exit_code == 130 and "Interrupted" in res.output and "Traceback" not in res.output, res.output
