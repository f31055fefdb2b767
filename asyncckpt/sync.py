"""``SyncCheckpointManager``: the manager for synchronous code, such as a plain PyTorch loop.

Each facade runs a :class:`~asyncckpt.MultiNodeCheckpointManager` on an event loop of its
own, in a thread it starts when it is created and stops in :meth:`~SyncCheckpointManager.close`.
Its methods are generated from the async manager's: every public coroutine method becomes
a blocking one with the same arguments, plain methods and properties pass through, so the
two classes cannot drift apart.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import threading
import weakref
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import CheckpointStateError
from .manager import MultiNodeCheckpointManager
from .staging import SaveHandle

__all__ = ["SyncCheckpointManager", "SyncSaveHandle"]

T = TypeVar("T")


class SyncSaveHandle:
    """The pending commit of :meth:`SyncCheckpointManager.save_async`, for blocking code.

    :meth:`result` waits for the commit and raises the save's error; :meth:`done` says
    whether the save has ended; :meth:`cancel` stops it (the epoch is then not committed).
    A failure nobody asked for is raised by the next save or by ``close``, as with the
    async manager.
    """

    def __init__(self, owner: SyncCheckpointManager, handle: SaveHandle):
        self._owner = owner
        self._handle = handle
        self._cancelled = False
        self.epoch = handle.epoch
        #: how long ``save_async`` held the caller (the snapshot), in seconds
        self.blocking_seconds = handle.blocking_seconds

    def done(self) -> bool:
        """Whether the save has ended (committed, failed or cancelled)."""
        return self._handle.done()

    def cancel(self) -> bool:
        """Cancel the save if it is still running; ``True`` if it was asked to stop."""
        if self._owner.closed:
            return False
        cancelled = self._owner._call_on_loop(self._handle.cancel)
        self._cancelled = self._cancelled or cancelled
        return cancelled

    def result(self, timeout: float | None = None) -> None:
        """Wait until the epoch is committed; raise the save's error if it failed.

        With ``timeout`` (seconds), :class:`TimeoutError` is raised when the save is
        still running by then; the save goes on. A cancelled save raises
        :class:`concurrent.futures.CancelledError`.
        """
        if not self._owner.closed:
            self._owner._run(self._handle.wait(), timeout, "SyncSaveHandle.result()")
            return
        # close() waited for the save: its outcome is known without the loop
        self._handle.mark_seen()
        failure = self._handle.exception()
        if failure is not None:
            raise failure
        if self._cancelled:
            raise concurrent.futures.CancelledError(f"the save of epoch {self.epoch} was cancelled")

    def __repr__(self) -> str:
        return f"<SyncSaveHandle epoch={self.epoch} {'done' if self.done() else 'in flight'}>"


class SyncCheckpointManager:
    """:class:`~asyncckpt.MultiNodeCheckpointManager` for synchronous code.

    It takes the same arguments and has the same methods: every coroutine method of the
    async manager is a blocking method here (``mgr.save(3)`` returns once epoch 3 is
    committed), plain methods and properties are the same, and exceptions are the
    async manager's, unchanged. :meth:`save_async` returns a :class:`SyncSaveHandle`.
    Callbacks the async manager calls from its event loop (``progress=``, a metadata
    handler's methods) run on this manager's thread.

    Use it as ``with SyncCheckpointManager(url) as mgr:`` (or call :meth:`close`): the
    async manager and its event-loop thread live until then. A blocking method called
    from a thread that runs an event loop raises :class:`~asyncckpt.CheckpointStateError`
    (it would stall that loop, or deadlock this manager's own): async code uses
    ``MultiNodeCheckpointManager`` directly.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        self._closed = False
        _refuse_inside_running_loop("SyncCheckpointManager()")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=_serve, args=(self._loop,), name="asyncckpt-sync-manager", daemon=True)
        self._thread.start()
        self._stop = weakref.finalize(self, _stop_loop_thread, self._loop, self._thread)
        try:
            self._manager: MultiNodeCheckpointManager = self._run(
                _construct(*args, **kwargs), None, "SyncCheckpointManager()"
            )
        except BaseException:
            self._closed = True
            self._stop()
            raise

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> SyncCheckpointManager:
        self._call("__aenter__", (), {})
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Wait for a ``save_async`` still in flight, close the async manager, stop the thread.

        The manager can not be used afterwards; a second ``close`` does nothing. A
        background save that failed and whose handle was never asked raises here.
        """
        if self._closed:
            return
        _refuse_inside_running_loop("SyncCheckpointManager.close()")
        self._closed = True
        try:
            self._run(self._manager.close(), None, "SyncCheckpointManager.close()")
        finally:
            self._stop()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    # ------------------------------------------------------------------ save_async

    def save_async(self, *args: Any, **kwargs: Any) -> SyncSaveHandle:
        """Snapshot every local workspace now; upload and commit in the background.

        Returns once the state is copied (the caller may change its workspaces right
        away) with a :class:`SyncSaveHandle`. Otherwise as
        :meth:`MultiNodeCheckpointManager.save_async`: at most one save is in flight,
        and a failure nobody asked for is raised by the next save or by :meth:`close`.
        """
        return SyncSaveHandle(self, self._call("save_async", args, kwargs))

    # ------------------------------------------------------------------ calls on the loop

    def _call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Await the async manager's coroutine method ``name`` on the loop thread; block until done."""
        if self._closed:
            raise CheckpointStateError(f"this SyncCheckpointManager is closed (calling {name}())")

        async def call() -> Any:
            return await getattr(self._manager, name)(*args, **kwargs)

        return self._run(call(), None, f"SyncCheckpointManager.{name}()")

    def _call_on_loop(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``function(*args, **kwargs)`` run between the loop's steps, so that it never
        interleaves with a save in flight; directly once closed, or on the loop thread.
        Quick, so allowed from any thread."""
        if self._closed or threading.current_thread() is self._thread:
            return function(*args, **kwargs)

        async def call() -> T:
            return function(*args, **kwargs)

        return _wait(asyncio.run_coroutine_threadsafe(call(), self._loop), None)

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None, what: str) -> T:
        """Run ``coro`` on the loop thread and wait for it (at most ``timeout`` seconds);
        refused (``coro`` closed unstarted) from a thread that runs an event loop."""
        try:
            _refuse_inside_running_loop(what)
        except CheckpointStateError:
            coro.close()
            raise
        return _wait(asyncio.run_coroutine_threadsafe(coro, self._loop), timeout)

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<SyncCheckpointManager{state} of {self._manager!r}>"

    if TYPE_CHECKING:  # the methods generated below, for type checkers

        def __getattr__(self, name: str) -> Any: ...


async def _construct(*args: Any, **kwargs: Any) -> MultiNodeCheckpointManager:
    """The async manager, built on the loop thread it will run on."""
    return MultiNodeCheckpointManager(*args, **kwargs)


def _wait(future: concurrent.futures.Future[T], timeout: float | None) -> T:
    """The result of ``future``: its exception is raised unchanged; if the wait ends
    otherwise (a timeout, ``KeyboardInterrupt``), the coroutine behind it is cancelled."""
    try:
        return future.result(timeout)
    except BaseException:
        future.cancel()
        raise


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    """The facade's thread: run ``loop`` until stopped, then finish its tasks, async
    generators and worker threads, and close it."""
    with asyncio.Runner(loop_factory=lambda: loop) as runner:
        runner.get_loop().run_forever()


def _stop_loop_thread(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    if thread.is_alive():
        loop.call_soon_threadsafe(loop.stop)
        if threading.current_thread() is not thread:
            thread.join()


def _refuse_inside_running_loop(what: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise CheckpointStateError(
        f"{what} blocks until it is done, so it cannot be called from a thread that runs an event loop "
        "(it would stall that loop, or deadlock it); in async code use MultiNodeCheckpointManager"
    )


# ---------------------------------------------------------------------- generated members


def _blocking(name: str, coroutine_function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(coroutine_function)
    def method(self: SyncCheckpointManager, *args: Any, **kwargs: Any) -> Any:
        return self._call(name, args, kwargs)

    method.__doc__ = (
        f"Blocking :meth:`MultiNodeCheckpointManager.{name}`.\n\n{inspect.getdoc(coroutine_function) or ''}"
    )
    return method


def _on_loop(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def method(self: SyncCheckpointManager, *args: Any, **kwargs: Any) -> Any:
        return self._call_on_loop(getattr(self._manager, name), *args, **kwargs)

    return method


def _passed_through(name: str, prop: property) -> property:
    def fget(self: SyncCheckpointManager) -> Any:
        return getattr(self._manager, name)

    def fset(self: SyncCheckpointManager, value: Any) -> None:
        self._call_on_loop(setattr, self._manager, name, value)

    return property(fget, fset if prop.fset is not None else None, doc=prop.__doc__)


def _forward_public_members() -> None:
    """Give :class:`SyncCheckpointManager` every public member of the async manager that it
    does not define itself: coroutine methods block, the rest pass through."""
    members: dict[str, object] = {}
    for klass in reversed(MultiNodeCheckpointManager.__mro__[:-1]):  # inherited ones too, overrides last
        members.update(vars(klass))
    for name, member in members.items():
        if name.startswith("_") or name in vars(SyncCheckpointManager):
            continue
        if isinstance(member, property):
            setattr(SyncCheckpointManager, name, _passed_through(name, member))
        elif inspect.iscoroutinefunction(member):
            setattr(SyncCheckpointManager, name, _blocking(name, member))
        elif inspect.isfunction(member):
            setattr(SyncCheckpointManager, name, _on_loop(name, member))
        else:
            setattr(SyncCheckpointManager, name, member)


_forward_public_members()
SyncCheckpointManager.__init__.__signature__ = inspect.signature(  # type: ignore[attr-defined]
    MultiNodeCheckpointManager.__init__
)
SyncCheckpointManager.save_async.__signature__ = inspect.signature(  # type: ignore[attr-defined]
    MultiNodeCheckpointManager.save_async
).replace(return_annotation="SyncSaveHandle")
