"""What every ``scatlas`` command module shares: the error handling of the group, output helpers, logging setup
and the option bundles. :mod:`scatlas.cli` defines the group; command modules (``cli_*.py``) import from here."""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from scatlas.atlas.errors import DUCKDB_LOCK_MARKERS, ScatlasError
from scatlas.atlas.genes import MIN_GENE_OVERLAP
from scatlas.atlas.outputs import (
    check_output_file,
    marked,
    os_error_message,
    safe_text,
    show,
    writing,
)
from scatlas.atlas.validate import escaped

logger = logging.getLogger("scatlas")


class PathArg(click.Path):
    """``click.Path`` whose value, when it holds ``..``, is the path it names (resolved): ``--out x/../y`` writes
    ``y`` and does not create ``x`` on the way."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        out = super().convert(value, param, ctx)
        if isinstance(out, (str, Path)) and ".." in Path(out).parts:
            resolved = os.path.realpath(out)
            return Path(resolved) if isinstance(out, Path) else resolved
        return out


class ScatlasGroup(click.Group):
    """Turns every ScatlasError into ``Error: ...`` on stderr and exit status 1, without a traceback.

    As a last resort it does the same for errors of the operating system (disk full, read-only, permissions), a
    DuckDB file locked by another process, and a file name a library cannot encode.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise  # already a message (from a nested group), or click's own exit
        except ScatlasError as exc:
            raise click.ClickException(safe_text(str(exc))) from exc
        except KeyboardInterrupt:
            _interrupted(ctx)
        except BrokenPipeError:
            # the reader of our output went away (``scatlas info INDEX | head -1``): stop quietly, as a command
            # killed by SIGPIPE would, with stdout pointed at /dev/null so that the final flush cannot fail again
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            ctx.exit(141)
        except OSError as exc:
            raise click.ClickException(os_error_message(exc)) from exc
        except UnicodeError as exc:
            if "surrogates" not in str(exc):
                raise
            raise click.ClickException(
                "a file or directory name is not valid UTF-8, and a library used here cannot open it; rename it "
                "(or link it) to a UTF-8 name and rerun"
            ) from exc
        except Exception as exc:
            if _tiledb_cancelled(exc):  # TileDB's own SIGINT handler cancelled a query: an interrupt all the same
                _interrupted(ctx)
            message = _duckdb_message(exc) or _os_phrase_message(exc)
            if message is None:
                raise
            raise click.ClickException(message) from exc


def _interrupted(ctx: click.Context) -> None:
    _echo("Interrupted; rerun the same command (builds, updates, sweeps and evaluations resume where they "
          "stopped; other commands start over).", err=True)
    ctx.exit(130)


def _tiledb_cancelled(exc: BaseException) -> bool:
    """Whether ``exc`` is TileDB's report of a query it cancelled on a SIGINT (it installs a SIGINT handler of its
    own, which cancels running queries even where the process ignores SIGINT)."""
    return type(exc).__name__ in ("SOMAError", "TileDBError") and "cancelled" in str(exc).lower()


_LOCKED = DUCKDB_LOCK_MARKERS
_DUCKDB_OS = {"No space left on device": "free space on that file system, or write somewhere else",
              "Read-only file system": "that file system is read-only: write somewhere else",
              "Permission denied": "check the permissions of that path",
              "Disk quota exceeded": "free space within your quota, or write somewhere else"}


def _os_phrase_message(exc: Exception) -> str | None:
    """``Error:`` text for a library's own exception that reports a full or read-only disk, or a permission it was
    denied (TileDB, FAISS, ...)."""
    text = str(exc)
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        if os.strerror(code) in text:
            return os_error_message(OSError(code, os.strerror(code)), "writing") + f" ({type(exc).__name__})"
    if os.strerror(errno.EACCES) in text:  # e.g. TileDB: "Cannot open file '/store/experiment/...'; Permission denied"
        found = re.search(r"'(/[^']{1,4096})'", text)
        path = found.group(1) if found else None
        return os_error_message(OSError(errno.EACCES, os.strerror(errno.EACCES)), "accessing", path) + \
            f" ({type(exc).__name__})"
    return None


def _duckdb_message(exc: Exception) -> str | None:
    """``Error:`` text for a DuckDB error about its database file (locked, disk full, ...), else None."""
    duckdb = sys.modules.get("duckdb")
    if duckdb is None or not isinstance(exc, duckdb.Error):
        return None
    text = str(exc)
    match = re.search(r'(?:lock on file|database file) "([^"]+)"', text)
    name = f"the DuckDB database {show(match.group(1))}" if match else "a DuckDB database file of this command"
    if any(marker in text for marker in _LOCKED):
        return (f"{name} is in use by another process; wait for that process to finish (or stop it), "
                "then rerun")
    for reason, hint in _DUCKDB_OS.items():
        if reason in text:
            return f"{reason} while accessing {name}: {hint}"
    return None


def _echo(message: str, **kwargs: Any) -> None:
    """``click.echo`` of text that may hold a non-UTF-8 file name (shown with U+FFFD instead of failing)."""
    click.echo(safe_text(message), **kwargs)


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet or not verbose else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    for noisy in ("numba", "h5py", "matplotlib", "PIL", "fsspec", "faiss", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# -- shared option bundles ---------------------------------------------------------------------------------------


def atlas_option(required: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--atlas", "atlas_dir", type=PathArg(file_okay=False, path_type=Path), required=required,
        help="Atlas store directory (TileDB-SOMA experiment + DuckDB cell table).",
    )


def index_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--index", "index_dir", type=PathArg(file_okay=False, path_type=Path), required=True,
        help="Index directory written by `scatlas build`.",
    )(f)


def ignore_sigint_safely() -> None:
    """Where this process was started with SIGINT ignored (a command sent to the background by a script), ignore it
    with a Python handler that does nothing instead of ``SIG_IGN``.

    TileDB installs a SIGINT handler of its own on its first read and passes the signal on to the handler it
    replaced; passed on to ``SIG_IGN`` that crashes the process (a segmentation fault, exit status 139, on
    ``kill -INT``). A handler that does nothing keeps the parent's intent and is safe to pass on to."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, _ignore_signal)


def ignore_late_sigint() -> None:
    """Ignore SIGINT from here on (with the no-op handler, as :func:`ignore_sigint_safely`): called once the command
    has finished, so that a Ctrl-C while the interpreter shuts down cannot change its exit status. Main thread only."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _ignore_signal)


def _ignore_signal(signum: int, frame: Any) -> None:
    """A SIGINT the process was started to ignore: nothing to do."""


def query_gene_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--min-gene-overlap`` and ``--allow-species-mismatch``: how far a query's genes may differ from the
    embedder's (commands that embed cells of a file with the index's embedder)."""
    f = click.option("--allow-species-mismatch", is_flag=True,
                     help="Go on with cells whose genes look like another species than the index's (refused "
                          "otherwise).")(f)
    return click.option("--min-gene-overlap", type=click.FloatRange(0, 1), default=MIN_GENE_OVERLAP, show_default=True,
                        help="Refuse cells carrying less than this fraction of the embedder's genes.")(f)


def query_matrix_option(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--x-layer``: which matrix of the query's .h5ad to read (commands that embed cells of a file)."""
    return click.option("--x-layer", default=None, metavar="NAME",
                        help="The query's matrix to read: X, raw (adata.raw.X) or a layer name (layers/NAME also "
                             "works); default: raw counts wherever they are (X, layers['counts'], .raw), else "
                             "log-normalised values.")(f)


def progress_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")(f)


def executor_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--executor local|ray``, ``--ray-address``, ``--cpus-per-task``: where shard tasks run."""
    f = click.option("--cpus-per-task", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
                     help="With --executor ray: CPUs each shard task asks for (and the threads it uses).")(f)
    f = click.option("--ray-address", default=None, metavar="ADDR",
                     help="With --executor ray: the cluster (HOST:PORT, or 'auto' for the one `ray start` began on "
                          "this node). Default: a new local Ray cluster.")(f)
    return click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                        help="Run the shard tasks in this process (local) or as Ray tasks (pip install 'scatlas[ray]'; "
                             "paths must be visible to every node).")(f)


def _make_executor(executor: str, ray_address: str | None, cpus_per_task: float) -> Any:
    """None for the default local executor (the library picks its devices), else the chosen executor."""
    from scatlas.index.executor import RayExecutor

    if executor == "local":
        if ray_address is not None:
            raise click.UsageError("--ray-address is only used with --executor ray")
        return None
    return RayExecutor(ray_address, cpus_per_task=cpus_per_task)


def _split_pair(item: str, option: str, form: str, *, last: bool = False,
                show_item: Callable[[str], str] = repr) -> tuple[str, str]:
    """One ``A=B`` item of a repeated ``option``, split at its first ``=`` (``last``: its last) into two non-empty
    sides; otherwise click.BadParameter saying the ``form`` expected (e.g. ``SOURCE=TARGET``) and the item (as
    ``show_item`` writes it)."""
    key, sep, value = item.rpartition("=") if last else item.partition("=")
    if not sep or not key or not value:
        raise click.BadParameter(f"expected {form}, got {show_item(item)}", param_hint=option)
    return key, value


def _parse_obs_map(values: tuple[str, ...]) -> dict[str, str]:
    """The ``--obs-map SOURCE=TARGET`` items as a mapping (a source given twice: the last target)."""
    return dict(_split_pair(item, "--obs-map", "SOURCE=TARGET") for item in values)


def _value(value: Any, limit: int = 40) -> str:
    """A value from the data (a label, a group) as printed in a summary line: as it is when short and printable,
    else quoted with its control characters escaped and cut at ``limit`` (a newline in a label must not forge an
    output line, nor a 100,000-character label flood the terminal)."""
    text = "(missing)" if value is None else str(value)
    return text if len(text) <= limit and text.isprintable() else escaped(text, limit)


def _unmapped(value: Any, suggestions: dict[str, Any]) -> str:
    """A label value without a Cell Ontology term as a summary lists it: quoted (a label may hold commas or
    brackets), with its closest CL term when there is one (a suggestion: never applied)."""
    close = suggestions.get(value)
    return escaped(value, 40) + (f" (closest CL term: {close[0]} {_value(close[1], 60)})" if close else "")


def _echo_json(payload: Any, path: Path | None) -> None:
    """Write ``payload`` as JSON to ``path`` (atomically), when given."""
    if path is None:
        return
    from scatlas.atlas.atomic import write_json_atomic

    check_output_file(path, file_kind="json")
    with writing(path):
        write_json_atomic(path, marked(payload, "report") if isinstance(payload, dict) else payload)


def _echo_ontology_fill(dataset_id: str, rep: dict[str, Any]) -> None:
    """One dataset's --ontology-map outcome: labels mapped by the data's own terms, by the map, and not at all."""
    key, col = rep["label_key"], rep["term_column"]
    if not rep.get("label_column_present"):
        _echo(f"  ontology map: {dataset_id} has no {key} column; nothing filled")
        return
    line = (f"  ontology map ({key} -> {col}): {rep['labels']} labels: {rep['from_data']} had terms in the data, "
            f"{rep['from_map']} mapped by the map, {rep['partly_from_map']} partly, {rep['unmapped']} not mapped; "
            f"{rep['cells_filled']} cells filled")
    _echo(line)
    if rep["unmapped"]:
        resolvable = rep.get("unmapped_resolvable") or {}
        names = ", ".join(repr(v)[:60] + (f" ({resolvable[v][1]} match: {resolvable[v][2]})" if v in resolvable else "")
                          for v in rep["unmapped_labels"][:10])
        more = f" and {rep['unmapped'] - 10} more" if rep["unmapped"] > 10 else ""
        _echo(f"  not mapped: {names}{more}")
    if rep["n_conflicting_labels"]:
        names = ", ".join(f"{v!r:.60} ({n} cells)" for v, n in list(rep["conflicts"].items())[:10])
        _echo(f"  conflicts (the data's own term kept): {names}")
    if rep.get("map_labels_unused"):
        _echo(f"  {rep['map_labels_unused']} label(s) of the map name no {key} value of {dataset_id}: unused")


def _parse_pairs(values: tuple[str, ...], option: str) -> list[tuple[str, str]]:
    """The ``NAME=VALUE`` items of ``option`` as pairs, in order (split at the last ``=``)."""
    return [_split_pair(item, option, "NAME=VALUE", last=True) for item in values]


def _option_value(text: str) -> Any:
    """An ``--embedder-option`` value: an int, a float, true / false, else the text."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)
