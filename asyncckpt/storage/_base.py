"""The storage protocol: bytes under keys, nothing about blobs, nodes or epochs.

A :class:`Storage` is rooted at a location (``s3://bucket/prefix``, a directory, a
named in-memory store); keys are relative, ``/``-separated paths below that root.

Contract shared by every backend (checked by :mod:`asyncckpt.testing.storage_suite`):

* ``get``/``get_range``/``read_into``/``read_scatter`` of a missing key raise
  :class:`CheckpointNotFoundError` (a read of zero bytes too);
  ``head`` of a missing key returns ``None``; ``delete`` of a missing key is a no-op.
* ``get_range``/``read_into``/``read_scatter`` of bytes past the end of an existing object
  raise :class:`ObjectTooShortError` (whether that means a corrupted checkpoint is not
  storage's to say).
* ``put(..., create_only=True)`` never replaces an existing object: it raises
  :class:`CheckpointConflictError` instead, atomically (two racing creators: one wins).
* A write is all or nothing: readers see the old state or the whole new object, never
  a prefix of it. A :class:`ObjectWriter` that is aborted (or never committed) leaves
  nothing visible.
* Every other backend failure is a :class:`StorageError` naming the location;
  ``asyncio.CancelledError`` always propagates.
* The store keeps its own copy of written bytes: mutating a buffer after ``put``
  returns changes nothing stored.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextlib
import contextvars
import mmap
import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from .._tasks import shielded
from ..errors import ObjectTooShortError

__all__ = [
    "ByteBudget",
    "ObjectInfo",
    "ObjectWriter",
    "PendingUpload",
    "RequestStats",
    "Storage",
    "collect_request_stats",
    "record_request",
    "validate_key",
]

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class ObjectInfo:
    """What a listing or a HEAD says about an object."""

    key: str
    size: int
    last_modified: float | None = None  # unix seconds
    etag: str | None = None


@dataclass(frozen=True)
class PendingUpload:
    """A multipart upload that was started and neither completed nor aborted."""

    key: str
    upload_id: str
    initiated: float | None = None  # unix seconds


@dataclass
class RequestStats:
    """Counters of storage requests made inside :func:`collect_request_stats`."""

    requests: int = 0
    retries: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    objects_written: int = 0


# every collector active in the current context, outermost first
_active_stats: contextvars.ContextVar[tuple[RequestStats, ...]] = contextvars.ContextVar(
    "asyncckpt_request_stats", default=()
)


def record_request(*, retries: int = 0, sent: int = 0, received: int = 0, objects_written: int = 0) -> None:
    """Count one request against every stats collector active in the current context."""
    for stats in _active_stats.get():
        stats.requests += 1
        stats.retries += retries
        stats.bytes_sent += sent
        stats.bytes_received += received
        stats.objects_written += objects_written


class collect_request_stats:
    """Context manager: requests made inside it (and in tasks it spawns) are counted.

    Collectors nest: a request counts in every collector it is made inside of, so an
    outer one sees the requests of inner ones (the library's own per-node collectors
    included).
    """

    def __init__(self) -> None:
        self.stats = RequestStats()
        self._token: contextvars.Token[tuple[RequestStats, ...]] | None = None

    def __enter__(self) -> RequestStats:
        self._token = _active_stats.set((*_active_stats.get(), self.stats))
        return self.stats

    def __exit__(self, *exc: object) -> None:
        assert self._token is not None
        _active_stats.reset(self._token)


_KEY_RE = re.compile(r"^[A-Za-z0-9._\-/]+$")


def validate_key(key: str) -> str:
    """Reject keys that could escape the root or that backends disagree about."""
    if (
        not isinstance(key, str)
        or not key
        or key.startswith("/")
        or key.endswith("/")
        or not _KEY_RE.match(key)
        or any(not part or part.startswith(".") for part in key.split("/"))
    ):
        raise ValueError(f"invalid storage key {key!r}")
    return key


#: Buffers at least this big are anonymous memory mappings: their pages cost memory only
#: once written, and dropping one returns its memory to the system at once (a freed
#: ``bytearray`` of many MiB may stay in the allocator's heap, outside any budget).
_MAPPED_MIN = 1 << 20
#: At most this many warm buffers are kept between uses (their bytes count in the budget).
_WARM_MAX = 16

LeasedBuffer = bytearray | mmap.mmap


def new_buffer(size: int) -> LeasedBuffer:
    """A writable, zero-filled buffer of ``size`` bytes (see :data:`_MAPPED_MIN`)."""
    return mmap.mmap(-1, size) if size >= _MAPPED_MIN else bytearray(size)


class ByteBudget:
    """A limit on the bytes of memory held at once: bytes granted to their users
    (:attr:`in_use`, for example upload buffers in flight) plus warm buffers kept for
    reuse (:attr:`pooled`). ``in_use + pooled`` never passes :attr:`limit`, with one
    exception: a request larger than the whole limit is granted when nothing else is
    held, so it can never deadlock.

    Requests are served first come, first served. ``acquire(n)`` waits until ``n``
    more bytes fit; :meth:`lease` waits for a buffer, a warm one of about the right
    size when one is kept, else a new one once its bytes fit. Warm buffers give way:
    one that no request can use is dropped to make room, never waited for.
    :meth:`give_back` returns a leased buffer, which stays warm (still counted) for
    the next lease. ``release`` and ``give_back`` are synchronous, so they are safe
    in ``finally`` blocks of cancelled tasks.
    """

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"ByteBudget limit must be positive, got {limit}")
        self.limit = limit
        self.in_use = 0
        self.pooled = 0
        self._warm: list[LeasedBuffer] = []  # smallest first
        # (bytes, whether a buffer is wanted, the future that serves the request)
        self._waiters: collections.deque[tuple[int, bool, asyncio.Future[LeasedBuffer | None]]] = collections.deque()

    def _fits(self, n: int) -> bool:
        held = self.in_use + self.pooled
        return held == 0 or held + n <= self.limit

    def _take_warm(self, size: int) -> LeasedBuffer | None:
        """The smallest warm buffer of ``size`` to ``2 * size`` bytes, now in use."""
        for i, buf in enumerate(self._warm):
            if size <= len(buf) <= 2 * size:
                del self._warm[i]
                self.pooled -= len(buf)
                self.in_use += len(buf)
                return buf
        return None

    def _serve(self, n: int, wants_buffer: bool) -> tuple[bool, LeasedBuffer | None]:
        """Serve a request now if possible: (served, the warm buffer it got, if any)."""
        if wants_buffer:
            warm = self._take_warm(n)
            if warm is not None:
                return True, warm
        while self._warm and not self._fits(n):
            self.pooled -= len(self._warm.pop())  # the largest goes first
        if not self._fits(n):
            return False, None
        self.in_use += n
        return True, None

    async def _wait(self, n: int, wants_buffer: bool) -> LeasedBuffer | None:
        future: asyncio.Future[LeasedBuffer | None] = asyncio.get_running_loop().create_future()
        entry = (n, wants_buffer, future)
        self._waiters.append(entry)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # served just as we were cancelled: give it back
                served = future.result()
                if served is None:
                    self.release(n)
                else:
                    self.give_back(served)
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                self._wake()
            raise

    def _wake(self) -> None:
        while self._waiters:
            n, wants_buffer, future = self._waiters[0]
            if future.done():
                self._waiters.popleft()
                continue
            served, warm = self._serve(n, wants_buffer)
            if not served:
                break
            self._waiters.popleft()
            future.set_result(warm)

    async def acquire(self, n: int) -> None:
        """Wait until ``n`` more bytes fit, and hold them (until :meth:`release`)."""
        if not self._waiters and self._serve(n, False)[0]:
            return
        await self._wait(n, False)

    def release(self, n: int) -> None:
        self.in_use -= n
        self._wake()

    async def lease(self, size: int) -> LeasedBuffer:
        """A writable buffer of ``size`` to ``2 * size`` bytes, counted in :attr:`in_use`
        by its whole length until :meth:`give_back`: a warm one (its content is stale)
        or a new, zero-filled one."""
        if not self._waiters:
            served, warm = self._serve(size, True)
            if served:
                return warm if warm is not None else self._allocate(size)
        warm = await self._wait(size, True)
        return warm if warm is not None else self._allocate(size)

    def _allocate(self, size: int) -> LeasedBuffer:
        try:
            return new_buffer(size)
        except BaseException:
            self.release(size)
            raise

    def give_back(self, buf: LeasedBuffer) -> None:
        """Return a leased buffer. A mapped one is kept warm (its bytes move from
        :attr:`in_use` to :attr:`pooled`) while the pool has room; any other is dropped
        and its bytes are free."""
        size = len(buf)
        self.in_use -= size
        if (
            isinstance(buf, mmap.mmap)
            and len(self._warm) < _WARM_MAX
            and self.in_use + self.pooled + size <= self.limit
        ):
            self.pooled += size
            self._warm.append(buf)
            self._warm.sort(key=len)
        self._wake()

    def drop_warm_buffers(self) -> None:
        """Drop every warm buffer (their memory is returned once nothing views them)."""
        self._warm.clear()
        self.pooled = 0
        self._wake()


class ObjectWriter(ABC):
    """Streams one object; nothing is visible until :meth:`commit` returns.

    Use it as ``async with``: leaving the block without :meth:`commit` (normally or by
    an exception or cancellation) aborts the write and releases what it holds.
    """

    key: str

    @abstractmethod
    async def write(self, data: Buffer) -> None:
        """Append bytes. The writer copies what it keeps; ``data`` may be reused after."""

    async def write_borrowed(self, data: Buffer) -> None:
        """Append bytes the writer may keep without copying them: ``data`` must stay
        unchanged until :meth:`commit` or :meth:`abort` returns. A backend that can send
        the caller's memory as it is (S3) saves a copy and its buffer; this default
        copies (it is :meth:`write`)."""
        await self.write(data)

    @abstractmethod
    async def commit(self) -> ObjectInfo:
        """Make the object visible (replacing any old one) and return its info."""

    @abstractmethod
    async def abort(self) -> None:
        """Drop everything written; safe to call more than once and after a failure."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # leaving the block without commit() drops everything (abort after commit is a no-op)
        await shielded(self.abort())


class Storage(ABC):
    """An async key -> bytes store rooted at one location. Use it as ``async with``."""

    #: The root location as a URL (``s3://bucket/prefix``, ``file:///dir``, ``memory://name``).
    url: str
    #: The storage kind: ``"s3"``, ``"file"`` or ``"memory"``.
    kind: str

    async def open(self) -> None:
        """Acquire clients or handles. Called once before any other method."""

    async def close(self) -> None:
        """Release what :meth:`open` acquired. Safe to call twice."""

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def url_of(self, key: str) -> str:
        """The full URL of ``key``."""
        return f"{self.url.rstrip('/')}/{key}"

    # -- reads --------------------------------------------------------------------------

    @abstractmethod
    async def get(self, key: str) -> bytes:
        """The whole object."""

    @abstractmethod
    async def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the object.

        Raises :class:`ObjectTooShortError` when ``end`` passes the object's size.
        """

    async def read_into(self, key: str, buffer: memoryview, start: int = 0) -> None:
        """Fill ``buffer`` with the object's bytes from ``start`` on.

        Raises :class:`ObjectTooShortError` when the object ends before the buffer is
        full. Override it to avoid the intermediate ``bytes`` of :meth:`get_range`.
        """
        data = await self.get_range(key, start, start + buffer.nbytes)
        if len(data) != buffer.nbytes:
            raise ObjectTooShortError(
                f"{self.url_of(key)}: object ends before byte {start + buffer.nbytes} "
                f"(got {len(data)} of {buffer.nbytes} bytes)",
                key=key,
            )
        buffer[:] = data

    async def read_scatter(self, key: str, views: Sequence[memoryview], start: int = 0) -> None:
        """Fill ``views`` (writable, contiguous byte views), one after the other, with
        the object's bytes from ``start`` on, as ``preadv`` does: the first view gets
        bytes ``[start, start + len(views[0]))``, the next the bytes after those.

        Raises :class:`ObjectTooShortError` when the object ends before the last view is
        full; views of zero bytes are allowed anywhere, and when every view is empty the
        object is only checked to exist (as :meth:`read_into` of an empty buffer does).
        Override it to read the whole span with one request (S3: one ranged GET); this
        default makes one :meth:`read_into` per non-empty view.
        """
        filled = [view for view in views if view.nbytes]
        if not filled:
            await self.read_into(key, memoryview(bytearray(0)), start)
        for view in filled:
            await self.read_into(key, view, start)
            start += view.nbytes

    @abstractmethod
    async def head(self, key: str) -> ObjectInfo | None:
        """The object's info, or ``None`` if it does not exist."""

    async def exists(self, key: str) -> bool:
        return await self.head(key) is not None

    @abstractmethod
    def list(self, prefix: str = "") -> AsyncIterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in key order."""

    @abstractmethod
    async def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        """The names of the "directories" directly below ``prefix`` (which ends in ``/`` or is empty)."""

    # -- writes -------------------------------------------------------------------------

    @abstractmethod
    async def put(self, key: str, data: Buffer, *, create_only: bool = False) -> None:
        """Store ``data`` under ``key``; with ``create_only`` never replace an existing object."""

    @abstractmethod
    def writer(self, key: str, *, budget: ByteBudget | None = None, size_hint: int | None = None) -> ObjectWriter:
        """A streaming writer for a (possibly large) object; ``budget`` bounds its buffers.

        ``size_hint``, an upper bound of the final size when the caller knows it, lets
        a backend plan its parts (no tiny last part).
        """

    @abstractmethod
    async def delete(self, keys: Iterable[str]) -> None:
        """Delete objects; missing ones are ignored."""

    # -- whole-location probes and housekeeping ----------------------------------------

    @abstractmethod
    async def check_root(self) -> None:
        """Raise :class:`StorageError` unless the root location is reachable and usable."""

    async def list_pending_uploads(self, prefix: str = "") -> builtins.list[PendingUpload]:
        """Unfinished multipart uploads under ``prefix`` (none for backends without them)."""
        return []

    async def abort_pending_upload(self, upload: PendingUpload) -> None:
        """Abort one unfinished multipart upload."""
