"""A plugin's storage, opened and driven by an event loop of its own in a background thread.

DCP calls a storage plugin synchronously, from the training thread or (``async_save``)
from DCP's worker thread. A :class:`StorageSession` runs coroutines on its private loop
and blocks the calling thread until they end, from whichever thread calls; the
storage's client lives on that loop from :meth:`StorageSession.open` to
:meth:`StorageSession.close` (or the session's garbage collection, or interpreter exit).
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from ..config import TransferConfig
from ..storage import ByteBudget, Storage, storage_for

__all__ = ["StorageSession"]

T = TypeVar("T")


class StorageSession:
    """One opened storage of a location plus the loop thread that drives it.

    :meth:`run` awaits a coroutine function of the storage (and this session's
    :class:`~asyncckpt.storage.ByteBudget`) on the loop and returns its result or raises
    its exception unchanged. :meth:`close` closes the storage and stops the thread; it is
    idempotent and also runs when the session is garbage collected.
    """

    def __init__(self, url: str, options: dict[str, Any], config: TransferConfig):
        self.storage: Storage = storage_for(url, options=options, config=config)
        self._config = config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=_serve, args=(self._loop,), name="asyncckpt-dcp", daemon=True)
        self._thread.start()
        self._finalizer = weakref.finalize(self, _shut_down, self._loop, self._thread, self.storage)
        self.budget: ByteBudget | None = None
        try:
            self.run(self._open)
        except BaseException:
            self.close()
            raise

    async def _open(self) -> None:
        await self.storage.open()
        self.budget = ByteBudget(self._config.max_bytes_in_flight)  # its futures belong to this loop

    def run(self, function: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """``await function()`` on the session's loop; block until it ends. If the wait is
        interrupted (``KeyboardInterrupt``), the coroutine is cancelled."""
        future = asyncio.run_coroutine_threadsafe(function(), self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def close(self) -> None:
        """Close the storage and stop the loop thread (waiting for both)."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    """The session's thread: run ``loop`` until stopped, then finish its tasks, async
    generators and worker threads, and close it."""
    with asyncio.Runner(loop_factory=lambda: loop) as runner:
        runner.get_loop().run_forever()


def _shut_down(loop: asyncio.AbstractEventLoop, thread: threading.Thread, storage: Storage) -> None:
    """Close ``storage`` on ``loop``, stop the loop and wait for ``thread`` to end (not
    waiting when called on that thread itself, as a garbage collection there may)."""
    if not thread.is_alive():
        return

    async def close() -> None:
        try:
            await storage.close()
        finally:
            loop.stop()

    future = asyncio.run_coroutine_threadsafe(close(), loop)
    if threading.current_thread() is not thread:
        try:
            future.result()
        finally:
            thread.join()  # the loop stops even when closing the storage failed
