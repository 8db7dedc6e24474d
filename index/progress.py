"""Progress bars of the index's and the query's long steps: on a terminal only, unless asked for anyway."""

from __future__ import annotations

from typing import Any, Literal

Progress = bool | Literal["always"]
"""``True``: a bar when stderr is a terminal (none in a pipe or a log file); ``"always"``: a bar anyway;
``False``: none."""


def bar_disabled(progress: Progress) -> bool | None:
    """tqdm's ``disable`` for ``progress`` (``None``: tqdm disables the bar when its output is not a TTY)."""
    if progress == "always":
        return False
    return None if progress else True


def progress_bar(progress: Progress = True, **kwargs: Any) -> Any:
    """A ``tqdm.auto`` bar (``kwargs`` as for tqdm), shown as :data:`Progress` says."""
    from tqdm.auto import tqdm

    return tqdm(disable=bar_disabled(progress), **kwargs)
