"""Uploads to S3: the streaming writer and the zero-copy request body.

An object whose size hint allows it (at most :func:`single_put_max` bytes) goes up as one
PUT at commit; any other object of at most one part too. A larger one is a multipart
upload whose parts go up concurrently while the caller keeps writing. A request's body
is a list of pieces sent as they lie in memory: views of what the caller lent
(:meth:`S3Writer.write_borrowed`) and of buffers holding what it wrote. Those buffers are
leased from a :class:`~asyncckpt.storage.ByteBudget`, which keeps them warm between
uploads and counts them, warm or in flight, against its limit; only a part's first
small copies (at most :data:`_HEAP_MAX` bytes) are plain ``bytes`` outside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from .._tasks import shielded
from ..config import TransferConfig
from ..errors import CheckpointError, StorageError
from ._base import Buffer, ByteBudget, LeasedBuffer, ObjectInfo, ObjectWriter, PendingUpload


class UploadTarget(Protocol):
    """What :class:`S3Writer` needs of its storage (``S3Storage``), and no more."""

    config: TransferConfig
    _budgets: weakref.WeakSet[ByteBudget]

    def _key(self, key: str) -> str: ...

    async def _call(self, op: str, key: str | None, *, sent: int = 0, written: int = 0, **kwargs: Any) -> Any: ...

    def url_of(self, key: str) -> str: ...

    async def abort_pending_upload(self, upload: PendingUpload) -> None: ...


__all__ = ["BufferBody", "S3Writer", "single_put_max"]

_THREAD_COPY_MIN = 1 << 20  # copies at least this big run off the event loop
_HEAP_MAX = 1 << 20  # small copies a part holds as their own bytes (outside the budget) before it leases a buffer


def single_put_max(config: TransferConfig) -> int:
    """The largest object a writer sends as one PUT when its size hint allows: four
    parts, 64 MiB with the default 16 MiB parts (far below S3's 5 GiB limit).

    Measured with 4 nodes saving at once from lent memory, one PUT per shard beats
    multipart on both loopback servers at every size tried: for 48 MiB shards 8
    requests instead of 24, 20% less client CPU and 25-35% less server CPU; for
    192 MiB shards 25% less client CPU and 40-45% less server CPU. What caps it is
    real S3, where one connection moves about 90 MB/s: a 64 MiB PUT still takes
    under a second, and larger shards go up in parallel parts on more connections.
    """
    return 4 * config.part_size


@dataclass
class _Part:
    """The bytes of one request body as they are gathered: pieces in order, and the
    leased buffers (holding the copied pieces) to give back once it is sent."""

    pieces: list[memoryview] = field(default_factory=list)
    size: int = 0
    buffers: list[LeasedBuffer] = field(default_factory=list)
    own: int = 0  # bytes of pieces copied into their own bytes (outside the budget)


class S3Writer(ObjectWriter):
    """Gathers writes into request bodies; see the module docstring for when an object
    is one PUT and when a multipart upload.

    :meth:`write` copies into buffers leased from ``budget`` (waiting for one is how a
    fast producer is held back), so the writer's buffers, in flight or kept warm, never
    pass its limit; :meth:`write_borrowed` sends the caller's memory as it is. A part
    is cut at ``part_size`` (a lent view is split there, never copied), or a little
    later, when the small rest the size hint announces fits in it (no tiny last part).
    Parts upload concurrently under the storage's request limit. Nothing is visible
    until :meth:`commit` completes the upload.

    An object hinted to fit one PUT stays one PUT while it keeps to its hint and its
    copied bytes to one buffer (see :meth:`_lease`); past either, it carries on as a
    multipart upload, whose first part is what was gathered so far. So a caller that
    copies everything gets the parts it always got, and one that lends gets one PUT.
    """

    def __init__(self, storage: UploadTarget, key: str, budget: ByteBudget | None, size_hint: int | None = None):
        self.key = key
        self._size_hint = size_hint
        self._storage = storage
        self._full_key = storage._key(key)
        self._budget = budget or ByteBudget(storage.config.max_bytes_in_flight)
        storage._budgets.add(self._budget)  # its warm buffers are dropped when the storage closes
        self._part_size = storage.config.part_size
        self._capacity = max(self._part_size, min(self._part_size + self._part_size // 4, self._budget.limit))
        self._single = size_hint is not None and size_hint <= single_put_max(storage.config)
        self._absorbing = False  # the open part takes the small rest instead of a tiny extra part
        self._open = _Part()
        self._buf: LeasedBuffer | None = None  # the open part's newest buffer, filled up to _fill
        self._fill = 0
        self._buf_end = 0  # how far _buf may be filled
        self._merge = False  # the open part's last piece ends at _fill of _buf: a copy extends it
        self._size = 0
        self._upload_id: str | None = None
        self._parts: dict[int, str] = {}
        self._next_part = 1
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._creating: asyncio.Future[Any] | None = None

    # -- gathering ----------------------------------------------------------------------

    def _check_open(self, op: str) -> None:
        if self._closed:
            raise StorageError(f"{self._storage.url_of(self.key)}: {op} after commit/abort", key=self.key)

    def _limit(self) -> int:
        """The size at which the open part is cut."""
        if self._single:
            assert self._size_hint is not None
            return self._size_hint
        return self._capacity if self._absorbing else self._part_size

    async def _grow_past_hint(self, n: int) -> None:
        """``n`` more bytes are coming: an object that outgrows its hint is multipart.

        Its open part may then be too small to send yet hold a buffer sized by the
        hint: its bytes move into one ``bytes`` of their own and the buffer goes back,
        so that the part never waits for a second buffer while it holds one."""
        if not self._single or self._size + n <= (self._size_hint or 0):
            return
        self._single = False
        part = self._open
        if part.buffers and part.size < self._part_size:
            pieces = list(part.pieces)
            if part.size >= _THREAD_COPY_MIN:
                joined = await asyncio.to_thread(b"".join, pieces)
            else:
                joined = b"".join(pieces)
            self._give_back(self._take_open_part())
            self._open = _Part([memoryview(joined)], len(joined), own=len(joined))

    async def write(self, data: Buffer) -> None:
        self._check_open("write")
        view = memoryview(data).cast("B")
        await self._grow_past_hint(view.nbytes)
        while view.nbytes:
            n = min(view.nbytes, self._room())
            if n:
                n = await self._copy(view[:n])
                view = view[n:]
            await self._cut_if_full()
            self._raise_failed_part()

    async def write_borrowed(self, data: Buffer) -> None:
        """Append ``data`` without copying it: its bytes go into the request bodies as
        they lie, so they must stay unchanged until :meth:`commit` or :meth:`abort`
        returns (a retried request sends them again)."""
        self._check_open("write")
        view = memoryview(data).cast("B")
        await self._grow_past_hint(view.nbytes)
        while view.nbytes:
            n = min(view.nbytes, self._room())
            if n:
                self._open.pieces.append(view[:n])
                self._open.size += n
                self._size += n
                self._merge = False
                view = view[n:]
            await self._cut_if_full()
            self._raise_failed_part()

    def _room(self) -> int:
        return max(0, self._limit() - self._open.size)

    async def _copy(self, src: memoryview) -> int:
        """Copy (a first part of) ``src`` into the open part's buffer; returns the bytes
        copied. A small copy with no room in a buffer is its own ``bytes`` instead (a
        part's first :data:`_HEAP_MAX` bytes of them), outside the budget: a header
        before lent arrays leases no part-sized buffer, and a part never holds budget
        bytes while it waits for its buffer (a wait that could be on itself)."""
        no_room = self._buf is None or self._fill == self._buf_end
        if no_room and src.nbytes < _THREAD_COPY_MIN and self._open.own + src.nbytes <= _HEAP_MAX:
            self._open.own += src.nbytes
            self._open.pieces.append(memoryview(bytes(src)))
            self._open.size += src.nbytes
            self._size += src.nbytes
            self._merge = False
            return src.nbytes
        if no_room:
            await self._lease()  # which may turn the object multipart and cut the open part
        assert self._buf is not None
        n = min(src.nbytes, self._buf_end - self._fill, self._room())
        target = memoryview(self._buf)[self._fill : self._fill + n]
        if n >= _THREAD_COPY_MIN:
            await asyncio.to_thread(target.__setitem__, slice(None), src[:n])
        else:
            target[:] = src[:n]
        if self._merge:
            last = self._open.pieces[-1]
            self._open.pieces[-1] = memoryview(self._buf)[self._fill - last.nbytes : self._fill + n]
        else:
            self._open.pieces.append(target)
        self._merge = True
        self._fill += n
        self._open.size += n
        self._size += n
        return n

    async def _lease(self) -> None:
        """A new buffer for the open part, of one part's capacity (buffers of one size
        go warm from part to part), the first no bigger than the hinted object. An
        object meant for one PUT whose copies need a second buffer is multipart from
        here on: what it copies can then go up part by part. Its one buffer takes no
        more than ``part_size`` bytes unless the whole object fits, so that it is the
        first part it would have been."""
        size = self._capacity
        if self._next_part == 1 and self._size_hint is not None:
            size = max(1, min(size, self._size_hint))  # a small object never holds a part-sized buffer
        if self._single and self._open.buffers:
            self._single = False
            await self._cut_if_full()
        buf = await self._budget.lease(size)
        self._open.buffers.append(buf)
        self._buf, self._fill, self._merge = buf, 0, False
        # one part's worth, unless it holds the whole object (its other pages stay untouched)
        fits = self._size_hint is not None and self._size_hint - self._size <= len(buf)
        self._buf_end = len(buf) if not self._single or fits else min(len(buf), self._part_size)

    async def _cut_if_full(self) -> None:
        """Send the open part once it is full (or, at ``part_size``, let it absorb the
        small rest the hint announces)."""
        if self._single or self._open.size < self._part_size:
            return
        if self._open.size == self._part_size and not self._absorbing:
            rest = (self._size_hint or 0) - self._size
            if 0 < rest <= self._capacity - self._part_size:
                self._absorbing = True
                return
        if self._open.size >= self._limit():
            self._absorbing = False
            await self._flush_part()

    def _raise_failed_part(self) -> None:
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    # -- sending ------------------------------------------------------------------------

    def _take_open_part(self) -> _Part:
        part, self._open = self._open, _Part()
        self._buf, self._fill, self._buf_end, self._merge = None, 0, 0, False
        return part

    def _give_back(self, part: _Part) -> None:
        buffers, part.buffers, part.pieces = part.buffers, [], []
        for buf in buffers:
            self._budget.give_back(buf)

    async def _flush_part(self) -> None:
        if self._upload_id is None:
            await self._start_upload()
        part = self._take_open_part()
        number = self._next_part
        self._next_part += 1
        task = asyncio.create_task(self._upload_part(number, part))
        # given back by a callback: it runs even if the task is cancelled before it starts
        task.add_done_callback(lambda _, part=part: self._give_back(part))  # type: ignore[misc]
        self._tasks.add(task)

    async def _start_upload(self) -> None:
        """CreateMultipartUpload, such that a cancel can never lose the upload's id
        (:meth:`abort` waits for the request and aborts what it created)."""
        self._creating = asyncio.ensure_future(
            self._storage._call("create_multipart_upload", self.key, Key=self._full_key)
        )
        response = await asyncio.shield(self._creating)
        self._upload_id = response["UploadId"]

    async def _upload_part(self, number: int, part: _Part) -> None:
        response = await self._storage._call(
            "upload_part",
            self.key,
            sent=part.size,
            Key=self._full_key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=BufferBody(*part.pieces),
        )
        self._parts[number] = response["ETag"]

    async def _wait_parts(self) -> None:
        pending = set(self._tasks)
        if pending:
            await asyncio.wait(pending)
        self._raise_failed_part()
        self._tasks.clear()

    async def commit(self) -> ObjectInfo:
        self._check_open("commit")
        try:
            if self._upload_id is None:
                # one PUT of everything gathered (its buffers are given back once the
                # request is done with them)
                part = self._open
                await self._storage._call(
                    "put_object", self.key, sent=part.size, written=1, Key=self._full_key, Body=BufferBody(*part.pieces)
                )
                self._give_back(self._take_open_part())
            else:
                if self._open.size:
                    await self._flush_part()
                await self._wait_parts()
                parts = [{"PartNumber": n, "ETag": etag} for n, etag in sorted(self._parts.items())]
                await self._storage._call(
                    "complete_multipart_upload",
                    self.key,
                    written=1,
                    Key=self._full_key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": parts},
                )
        except BaseException:
            await shielded(self.abort())
            raise
        self._closed = True
        return ObjectInfo(self.key, self._size, time.time())

    async def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        self._tasks.clear()
        self._give_back(self._take_open_part())
        if self._upload_id is None and self._creating is not None:
            with contextlib.suppress(Exception):  # a failed create left nothing to abort
                self._upload_id = (await self._creating)["UploadId"]
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            with contextlib.suppress(CheckpointError):
                await self._storage.abort_pending_upload(PendingUpload(self.key, upload_id))


class BufferBody:
    """A request body over buffers laid end to end, sent without copying them.

    botocore sees a seekable file-like object (``read``/``seek``/``tell`` and ``len``:
    it measures the length and rewinds it for a retry, which sends the same bytes
    again); aiohttp sees an async iterable and streams memoryview slices of the
    buffers, yielding to the event loop between them (a raw ``bytes`` body of many MiB
    would be copied into the transport in one go).
    """

    _CHUNK = 256 * 1024

    def __init__(self, *pieces: Buffer):
        self._views = [view for view in (memoryview(p).cast("B") for p in pieces) if view.nbytes]
        self._size = sum(view.nbytes for view in self._views)
        self._pos = 0

    def __len__(self) -> int:
        return self._size - self._pos

    def _slices(self, start: int, end: int) -> Iterator[memoryview]:
        """The pieces' bytes ``[start, end)`` as views, at most ``_CHUNK`` each."""
        offset = 0
        for view in self._views:
            lo, hi = max(start - offset, 0), min(end - offset, view.nbytes)
            for at in range(lo, hi, self._CHUNK):
                yield view[at : min(at + self._CHUNK, hi)]
            offset += view.nbytes
            if offset >= end:
                return

    def read(self, n: int | None = -1) -> bytes:
        end = self._size if n is None or n < 0 else min(self._size, self._pos + n)
        chunk = b"".join(self._slices(self._pos, end))
        self._pos = end
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._pos, self._size)[whence]
        self._pos = max(0, min(self._size, base + offset))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    async def __aiter__(self) -> AsyncIterator[memoryview]:
        first = True
        for chunk in self._slices(self._pos, self._size):
            if not first:
                await asyncio.sleep(0)
            first = False
            yield chunk
