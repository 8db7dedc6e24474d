"""Progress bars of the index's and the query's long steps: on a terminal only, unless asked for anyway.

Every step a bar counts is also where a thread's work can be stopped: :func:`set_interrupt_check` gives the calling
thread a check that runs at each of its bars' steps and raises (a lab server cancelling a job,
:class:`~scatlas.atlas.errors.Interrupted`); the work then unwinds as from any error, leaving what resumable work
leaves after an interruption.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, Literal

Progress = bool | Literal["always"]
"""``True``: a bar when stderr is a terminal (none in a pipe or a log file); ``"always"``: a bar anyway;
``False``: none."""

_local = threading.local()


def set_interrupt_check(check: Callable[[], None] | None) -> None:
    """Run ``check`` at every step of the progress bars this thread makes from now on (it raises to stop the
    work); ``None`` removes it."""
    _local.check = check


def check_interrupt() -> None:
    """Run this thread's interrupt check, if it has one."""
    check = getattr(_local, "check", None)
    if check is not None:
        check()


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
            self._check = getattr(_local, "check", None)
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if self._check is not None:
                self._check()
            return super().update(n)  # type: ignore[no-any-return]

    return Bar


def progress_bar(progress: Progress = True, **kwargs: Any) -> Any:
    """A ``tqdm.auto`` bar (``kwargs`` as for tqdm), shown as :data:`Progress` says; its steps run the calling
    thread's interrupt check (:func:`set_interrupt_check`)."""
    check_interrupt()
    return _bar_class()(disable=bar_disabled(progress), **kwargs)
