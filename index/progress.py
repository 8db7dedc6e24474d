"""Progress bars of the index's and the query's long steps: on a terminal only, unless asked for anyway.

Every step a bar counts is also where a thread's work can be stopped (:mod:`scatlas.atlas.interrupt`): a bar runs
the check of the thread that made it at each of its steps.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

from scatlas.atlas.interrupt import check_interrupt, interrupt_check

Progress = bool | Literal["always"]
"""``True``: a bar when stderr is a terminal (none in a pipe or a log file); ``"always"``: a bar anyway;
``False``: none."""


def bar_disabled(progress: Progress) -> bool | None:
    """tqdm's ``disable`` for ``progress`` (``None``: tqdm disables the bar when its output is not a TTY)."""
    if progress == "always":
        return False
    return None if progress else True


@functools.cache
def _bar_class() -> Any:
    from tqdm.auto import tqdm

    class Bar(tqdm):  # type: ignore[misc,valid-type]
        """A tqdm bar whose steps run the interrupt check of the thread that made it."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._check = interrupt_check()
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if self._check is not None:
                self._check()
            return super().update(n)  # type: ignore[no-any-return]

    return Bar


def progress_bar(progress: Progress = True, **kwargs: Any) -> Any:
    """A ``tqdm.auto`` bar (``kwargs`` as for tqdm), shown as :data:`Progress` says; its steps run the calling
    thread's interrupt check (:func:`scatlas.atlas.interrupt.set_interrupt_check`)."""
    check_interrupt()
    return _bar_class()(disable=bar_disabled(progress), **kwargs)
