"""The mark of a first build that has not finished: ``building.json`` in the index directory.

``build_index`` writes the shards and the manifest, then the steps that make the index what ``annotate`` expects
(label classes, label heads, the mapping calibration, the reference map). Were the manifest the only sign of a
finished index, a build stopped during those steps would leave an index that opens, verifies and annotates
without its heads or its mapping check, and nothing would say so. So the build marks the directory before it
starts, records the step it is at, and removes the mark only once every step is done. Readers refuse an index that
carries the mark (:func:`check_finished`); the build's own steps open it with ``unfinished_ok``. An update
(``build --update``) needs no mark: it commits its version only once complete (:mod:`index.versions`).
"""

from __future__ import annotations

from pathlib import Path

from scatlas.atlas.atomic import read_json_object, write_json_atomic
from scatlas.atlas.errors import IndexFormatError, ScatlasError

BUILDING_FILE = "building.json"


def mark_unfinished(index_dir: Path, step: str) -> None:
    """Mark ``index_dir`` as a build in progress, now at ``step`` (words: "training label heads")."""
    write_json_atomic(index_dir / BUILDING_FILE, {"step": step})


def mark_finished(index_dir: Path) -> None:
    """Remove the mark: every step of the build is done."""
    (index_dir / BUILDING_FILE).unlink(missing_ok=True)


def unfinished_step(index_dir: Path) -> str | None:
    """The step a build of ``index_dir`` stopped at, or None when no build is unfinished there."""
    path = index_dir / BUILDING_FILE
    if not path.exists():
        return None
    try:
        step = read_json_object(path, "rerun the build").get("step")
    except ScatlasError:
        step = None
    return step if isinstance(step, str) and step else "an unknown step"


def unfinished_message(index_dir: Path, step: str) -> str:
    return (
        f"the build of the index at {index_dir} did not finish (it stopped while {step}); rerun the same "
        "`scatlas build` command to finish it (it resumes where it stopped), or rebuild it with --overwrite"
    )


def check_finished(index_dir: Path) -> None:
    """IndexFormatError when a build of ``index_dir`` has not finished."""
    step = unfinished_step(index_dir)
    if step is not None:
        raise IndexFormatError(unfinished_message(index_dir, step))
