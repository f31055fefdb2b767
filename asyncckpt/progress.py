"""Progress of a save or a load: a user's ``progress(bytes_done, bytes_total)`` callback.

The manager opens a :func:`reporting` scope around an operation; the code that moves
bytes calls :func:`advance` (tasks spawned inside the scope report to it too). Calls to
the callback come from the event loop, at most every ``interval`` seconds, and once more
when the operation ends with everything done.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterator

__all__ = ["Progress", "advance", "check_progress", "reporting"]

Progress = Callable[[int, int], object]


class _Meter:
    def __init__(self, callback: Progress, total: int, interval: float):
        self.callback, self.total, self.interval = callback, total, interval
        self.done = 0
        self._last = float("-inf")

    def add(self, n: int) -> None:
        self.done = min(self.done + n, self.total)
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.callback(self.done, self.total)


_current: contextvars.ContextVar[_Meter | None] = contextvars.ContextVar("asyncckpt_progress", default=None)


def check_progress(progress: object) -> Progress | None:
    """``progress`` if it is callable (or ``None``); :class:`TypeError` otherwise."""
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be a callable(bytes_done, bytes_total), got {type(progress).__name__}")
    return progress


@contextlib.contextmanager
def reporting(progress: Progress | None, total: int, interval: float = 0.1) -> Iterator[None]:
    """Report bytes moved inside the scope to ``progress`` (nothing when ``None``); a
    scope that ends without an error reports ``(total, total)`` last."""
    if progress is None:
        yield
        return
    meter = _Meter(progress, total, interval)
    token = _current.set(meter)
    try:
        progress(0, total)
        yield
        progress(total, total)
    finally:
        _current.reset(token)


def advance(n: int) -> None:
    """``n`` more bytes were moved (a no-op outside a :func:`reporting` scope)."""
    meter = _current.get()
    if meter is not None:
        meter.add(n)
