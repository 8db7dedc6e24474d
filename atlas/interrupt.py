"""Stopping a thread's long work on request, at its next step (a lab server cancelling a job).

:func:`set_interrupt_check` gives the calling thread a check; long loops call :func:`check_interrupt` at each step
(the progress bars of :mod:`scatlas.index.progress` do, at each of theirs; scVI training at each epoch), where the
check raises :class:`~scatlas.atlas.errors.Interrupted` and the work unwinds as from any error.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

_local = threading.local()


def set_interrupt_check(check: Callable[[], None] | None) -> None:
    """Run ``check`` at every step of this thread's long work from now on (it raises to stop the work); ``None``
    removes it."""
    _local.check = check


def interrupt_check() -> Callable[[], None] | None:
    """This thread's check (None when it has none)."""
    return getattr(_local, "check", None)


def check_interrupt() -> None:
    """Run this thread's interrupt check, if it has one."""
    check = interrupt_check()
    if check is not None:
        check()
