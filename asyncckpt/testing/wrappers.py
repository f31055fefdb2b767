"""Storage wrappers for tests: inject failures (:class:`FaultyStorage`) or delays (:class:`LatencyStorage`).

Both wrap any :class:`~asyncckpt.storage.Storage` and delegate every method to it, so a
wrapped storage passes the same conformance suite as the storage it wraps. Each
operation the wrapper forwards has a name (:data:`OPERATIONS`) and is counted in
:attr:`StorageWrapper.calls`::

    storage = FaultyStorage(MemoryStorage("scratch"))
    truncated = storage.fail_on(lambda op, key: op == "read_into" and key.endswith(".shard"), ObjectTooShortError)
    ...
    assert truncated.hits == 1

The writer's ``write``/``commit``/``abort`` are operations of their own, named after the
method. For an operation on several keys (``delete``) a rule is asked about each key;
for one on none (``open``, ``close``, ``check_root``) it is asked with ``key=None``. The
list operations (``list``, ``list_dirs``, ``list_pending_uploads``) pass their prefix as
the key. Injection is deterministic: no randomness, every match is counted.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeGuard, TypeVar

from ..errors import StorageError
from ..storage import ByteBudget, ObjectInfo, ObjectWriter, PendingUpload, Storage
from ..storage._base import Buffer

__all__ = ["OPERATIONS", "Fault", "FaultyStorage", "LatencyStorage", "StorageWrapper"]

T = TypeVar("T")

#: The names of the operations a wrapper forwards (and can fail or delay).
OPERATIONS = frozenset(
    {
        "open",
        "close",
        "get",
        "get_range",
        "read_into",
        "read_scatter",
        "head",
        "exists",
        "list",
        "list_dirs",
        "put",
        "write",
        "commit",
        "abort",
        "delete",
        "check_root",
        "list_pending_uploads",
        "abort_pending_upload",
    }
)

#: What a fault raises: an exception (raised as is), an exception class (instantiated
#: with a message naming the operation and key), or a function of (op, key) returning one.
ErrorSpec = BaseException | type[BaseException] | Callable[[str, str | None], BaseException]


def _is_exception_class(error: ErrorSpec) -> TypeGuard[type[BaseException]]:
    """Whether ``error`` is an exception class (anything else callable is a function of (op, key))."""
    return isinstance(error, type) and issubclass(error, BaseException)


class StorageWrapper(Storage):
    """A storage that forwards every operation to ``inner`` through :meth:`intercept`.

    Subclasses override :meth:`intercept` to act before or after the forwarded call.
    ``url`` and ``kind`` are the inner storage's.
    """

    def __init__(self, inner: Storage):
        self.inner = inner
        self.url = inner.url
        self.kind = inner.kind
        #: How many times each operation was called (whether it then failed or not).
        self.calls: collections.Counter[str] = collections.Counter()

    async def intercept(self, op: str, keys: tuple[str | None, ...], call: Callable[[], Awaitable[T]]) -> T:
        """Run ``call`` (the forwarded operation ``op`` on ``keys``); the default adds nothing."""
        return await call()

    async def _forward(self, op: str, keys: tuple[str | None, ...], call: Callable[[], Awaitable[T]]) -> T:
        self.calls[op] += 1
        return await self.intercept(op, keys, call)

    # -- lifecycle and names ------------------------------------------------------------

    async def open(self) -> None:
        await self._forward("open", (None,), self.inner.open)

    async def close(self) -> None:
        await self._forward("close", (None,), self.inner.close)

    def url_of(self, key: str) -> str:
        return self.inner.url_of(key)

    # -- reads --------------------------------------------------------------------------

    async def get(self, key: str) -> bytes:
        return await self._forward("get", (key,), lambda: self.inner.get(key))

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        return await self._forward("get_range", (key,), lambda: self.inner.get_range(key, start, end))

    async def read_into(self, key: str, buffer: memoryview, start: int = 0) -> None:
        await self._forward("read_into", (key,), lambda: self.inner.read_into(key, buffer, start))

    async def read_scatter(self, key: str, views: Sequence[memoryview], start: int = 0) -> None:
        await self._forward("read_scatter", (key,), lambda: self.inner.read_scatter(key, views, start))

    async def head(self, key: str) -> ObjectInfo | None:
        return await self._forward("head", (key,), lambda: self.inner.head(key))

    async def exists(self, key: str) -> bool:
        return await self._forward("exists", (key,), lambda: self.inner.exists(key))

    async def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        async def listing() -> list[ObjectInfo]:
            return [info async for info in self.inner.list(prefix)]

        for info in await self._forward("list", (prefix,), listing):
            yield info

    async def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        return await self._forward("list_dirs", (prefix,), lambda: self.inner.list_dirs(prefix))

    # -- writes -------------------------------------------------------------------------

    async def put(self, key: str, data: Buffer, *, create_only: bool = False) -> None:
        await self._forward("put", (key,), lambda: self.inner.put(key, data, create_only=create_only))

    def writer(self, key: str, *, budget: ByteBudget | None = None, size_hint: int | None = None) -> ObjectWriter:
        return _WrappedWriter(self, self.inner.writer(key, budget=budget, size_hint=size_hint))

    async def delete(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        await self._forward("delete", tuple(keys) or (None,), lambda: self.inner.delete(keys))

    # -- probes and housekeeping -------------------------------------------------------

    async def check_root(self) -> None:
        await self._forward("check_root", (None,), self.inner.check_root)

    async def list_pending_uploads(self, prefix: str = "") -> builtins.list[PendingUpload]:
        return await self._forward("list_pending_uploads", (prefix,), lambda: self.inner.list_pending_uploads(prefix))

    async def abort_pending_upload(self, upload: PendingUpload) -> None:
        await self._forward("abort_pending_upload", (upload.key,), lambda: self.inner.abort_pending_upload(upload))


class _WrappedWriter(ObjectWriter):
    """Forwards a writer's ``write``/``write_borrowed``/``commit``/``abort`` through its storage wrapper."""

    def __init__(self, wrapper: StorageWrapper, inner: ObjectWriter):
        self.key = inner.key
        self._wrapper = wrapper
        self._inner = inner

    async def write(self, data: Buffer) -> None:
        await self._wrapper._forward("write", (self.key,), lambda: self._inner.write(data))

    async def write_borrowed(self, data: Buffer) -> None:
        await self._wrapper._forward("write", (self.key,), lambda: self._inner.write_borrowed(data))

    async def commit(self) -> ObjectInfo:
        return await self._wrapper._forward("commit", (self.key,), self._inner.commit)

    async def abort(self) -> None:
        await self._wrapper._forward("abort", (self.key,), self._inner.abort)


@dataclass(eq=False)
class Fault:
    """One rule of a :class:`FaultyStorage`: which calls fail, with what, how often.

    ``match(op, key)`` selects calls. The first ``skip`` matching calls go through; after
    them, at most ``times`` (``None``: all) raise ``error``. With ``after=True`` the
    call is forwarded first and the error raised once it has taken effect (as when a
    request succeeds but its answer is lost). ``seen`` counts matching calls, ``hits``
    injected faults.
    """

    match: Callable[[str, str | None], bool]
    error: ErrorSpec = StorageError
    times: int | None = None
    skip: int = 0
    after: bool = False
    seen: int = field(default=0, init=False)
    hits: int = field(default=0, init=False)

    def _fire(self, op: str, keys: tuple[str | None, ...]) -> BaseException | None:
        """Count a call of ``op`` on ``keys``; the exception to raise if this rule fires."""
        if self.times is not None and self.hits >= self.times:
            return None
        matching = [key for key in keys if self.match(op, key)]
        if not matching:
            return None
        self.seen += 1
        if self.seen <= self.skip:
            return None
        self.hits += 1
        return self.exception_for(op, matching[0])

    def exception_for(self, op: str, key: str | None) -> BaseException:
        """The exception this fault raises for a call of ``op`` on ``key``."""
        error = self.error
        if isinstance(error, BaseException):
            return error
        if _is_exception_class(error):
            message = f"injected fault: {op} {key if key is not None else ''}".rstrip()
            if issubclass(error, StorageError):
                return error(message, key=key, code="InjectedFault")
            if issubclass(error, asyncio.CancelledError):
                return error()
            return error(message)
        return error(op, key)


class FaultyStorage(StorageWrapper):
    """Fails chosen operations of the storage it wraps, deterministically.

    Rules (:class:`Fault`) are tried in the order they were added; the first that fires
    decides, and a call no rule fires for is forwarded untouched. An injected
    :class:`asyncio.CancelledError` is raised from inside the operation, as a
    cancellation delivered at its first ``await`` would be (the caller's task is not
    itself cancelled). Without rules the wrapper only counts calls.
    """

    def __init__(self, inner: Storage, *rules: Fault):
        super().__init__(inner)
        self.rules: list[Fault] = list(rules)
        #: How many faults were injected, by operation.
        self.faults: collections.Counter[str] = collections.Counter()

    def fail_on(
        self,
        match: Callable[[str, str | None], bool],
        error: ErrorSpec = StorageError,
        *,
        times: int | None = None,
        skip: int = 0,
        after: bool = False,
    ) -> Fault:
        """Add a rule (see :class:`Fault`) and return it, to read its counters later."""
        rule = Fault(match, error, times=times, skip=skip, after=after)
        self.rules.append(rule)
        return rule

    def clear_faults(self) -> None:
        """Drop every rule: from now on every call is forwarded untouched."""
        self.rules.clear()

    async def intercept(self, op: str, keys: tuple[str | None, ...], call: Callable[[], Awaitable[T]]) -> T:
        for rule in self.rules:
            error = rule._fire(op, keys)
            if error is not None:
                break
        else:
            return await call()
        if rule.after:
            await call()
        self.faults[op] += 1
        raise error


class LatencyStorage(StorageWrapper):
    """Delays every operation of the storage it wraps (zarr's ``LatencyStore``).

    Each forwarded call first sleeps ``delays[op]`` seconds, or ``delay`` for operations
    not named there. A delay of ``0`` still yields to the event loop once, which is
    enough to shake out code that assumes an operation never suspends.
    """

    def __init__(self, inner: Storage, delay: float = 0.0, *, delays: Mapping[str, float] | None = None):
        super().__init__(inner)
        unknown = set(delays or {}) - OPERATIONS
        if unknown:
            raise ValueError(f"unknown storage operation(s) {sorted(unknown)}; known: {sorted(OPERATIONS)}")
        if delay < 0 or any(d < 0 for d in (delays or {}).values()):
            raise ValueError("delays must not be negative")
        self.delay = delay
        self.delays = dict(delays or {})

    async def intercept(self, op: str, keys: tuple[str | None, ...], call: Callable[[], Awaitable[T]]) -> T:
        await asyncio.sleep(self.delays.get(op, self.delay))
        return await call()
