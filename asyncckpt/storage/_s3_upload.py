"""Uploads to S3: the streaming writer and the zero-copy request body.

An object of at most one part is one PUT; a larger one is a multipart upload whose parts
go up concurrently while the caller keeps writing. Part buffers are leased from a
:class:`~asyncckpt.storage.ByteBudget`, which keeps them warm between uploads and counts
them, warm or in flight, against its limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import AsyncIterator
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

    async def put(self, key: str, data: Buffer, *, create_only: bool = False) -> None: ...

    async def abort_pending_upload(self, upload: PendingUpload) -> None: ...


__all__ = ["BufferBody", "S3Writer"]

_THREAD_COPY_MIN = 1 << 20  # copies at least this big run off the event loop


class S3Writer(ObjectWriter):
    """Buffers writes into part-sized buffers; an object of at most one part is one PUT.

    Part buffers are leased from ``budget`` (waiting for one is how a fast producer is
    held back), so the writer's buffers, in flight or kept warm, never pass its limit.
    A buffer has room for a part plus the small rest a last part may absorb (never
    more than the budget). With ``size_hint`` the first buffer is no bigger than the
    object. Parts upload concurrently under the storage's request limit. Nothing is
    visible until :meth:`commit` completes the upload.
    """

    def __init__(self, storage: UploadTarget, key: str, budget: ByteBudget | None, size_hint: int | None = None):
        self.key = key
        self._size_hint = size_hint
        self._absorbing = False  # the last part takes the small rest instead of a tiny extra part
        self._storage = storage
        self._full_key = storage._key(key)
        self._budget = budget or ByteBudget(storage.config.max_bytes_in_flight)
        storage._budgets.add(self._budget)  # its warm buffers are dropped when the storage closes
        self._part_size = storage.config.part_size
        self._capacity = max(self._part_size, min(self._part_size + self._part_size // 4, self._budget.limit))
        self._buf: LeasedBuffer | None = None
        self._view = memoryview(b"")  # of the current buffer
        self._fill = 0
        self._size = 0
        self._upload_id: str | None = None
        self._parts: dict[int, str] = {}
        self._next_part = 1
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._creating: asyncio.Future[Any] | None = None

    async def _new_buffer(self) -> None:
        size = self._capacity
        if self._next_part == 1 and self._size_hint is not None:
            size = max(1, min(size, self._size_hint))  # a small object never holds a part-sized buffer
        self._buf = await self._budget.lease(size)
        self._view = memoryview(self._buf)
        self._fill = 0

    async def _move_to_a_full_buffer(self) -> None:
        """The first buffer, sized by a size hint that proved too small, is full: carry
        on in a buffer of full size (the old one is returned first, so this can never
        wait on itself)."""
        assert self._buf is not None
        held = bytes(self._view[: self._fill])
        self._release_current()
        self._buf = await self._budget.lease(self._capacity)
        self._view = memoryview(self._buf)
        self._view[: len(held)] = held
        self._fill = len(held)

    async def write(self, data: Buffer) -> None:
        if self._closed:
            raise StorageError(f"{self._storage.url_of(self.key)}: write after commit/abort", key=self.key)
        view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
        while view.nbytes:
            if self._buf is None:
                await self._new_buffer()
            limit = self._capacity if self._absorbing else self._part_size
            room = min(limit, self._view.nbytes) - self._fill
            if room <= 0:
                await self._move_to_a_full_buffer()
                continue
            n = min(view.nbytes, room)
            target = self._view[self._fill : self._fill + n]
            if n >= _THREAD_COPY_MIN:
                await asyncio.to_thread(target.__setitem__, slice(None), view[:n])
            else:
                target[:] = view[:n]
            self._fill += n
            self._size += n
            view = view[n:]
            if self._fill == self._part_size and not self._absorbing:
                rest = (self._size_hint or 0) - self._size
                if 0 < rest <= self._capacity - self._part_size:
                    self._absorbing = True  # what is left joins this part: no tiny last part
                else:
                    await self._flush_part()
            elif self._fill == limit:
                self._absorbing = False  # the hint was too small: carry on part by part
                await self._flush_part()
            self._raise_failed_part()

    def _raise_failed_part(self) -> None:
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _flush_part(self) -> None:
        if self._upload_id is None:
            await self._start_upload()
        buf, fill = self._buf, self._fill
        assert buf is not None
        body = self._view[:fill]
        self._buf, self._view, self._fill = None, memoryview(b""), 0
        number = self._next_part
        self._next_part += 1
        task = asyncio.create_task(self._upload_part(number, body, fill))
        # given back by a callback: it runs even if the task is cancelled before it starts
        task.add_done_callback(lambda _, buf=buf: self._budget.give_back(buf))  # type: ignore[misc]
        self._tasks.add(task)

    async def _start_upload(self) -> None:
        """CreateMultipartUpload, such that a cancel can never lose the upload's id
        (:meth:`abort` waits for the request and aborts what it created)."""
        self._creating = asyncio.ensure_future(
            self._storage._call("create_multipart_upload", self.key, Key=self._full_key)
        )
        response = await asyncio.shield(self._creating)
        self._upload_id = response["UploadId"]

    async def _upload_part(self, number: int, view: memoryview, fill: int) -> None:
        body = BufferBody(view)
        response = await self._storage._call(
            "upload_part",
            self.key,
            sent=fill,
            Key=self._full_key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=body,
        )
        self._parts[number] = response["ETag"]

    async def _wait_parts(self) -> None:
        pending = set(self._tasks)
        if pending:
            await asyncio.wait(pending)
        self._raise_failed_part()
        self._tasks.clear()

    async def commit(self) -> ObjectInfo:
        if self._closed:
            raise StorageError(f"{self._storage.url_of(self.key)}: commit after commit/abort", key=self.key)
        try:
            if self._upload_id is None:
                # small object: one PUT of whatever is buffered (the buffer is released
                # once the request is done with it)
                await self._storage.put(self.key, self._view[: self._fill])
                self._release_current()
            else:
                if self._fill:
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

    def _release_current(self) -> None:
        if self._buf is not None:
            buf, self._buf, self._view, self._fill = self._buf, None, memoryview(b""), 0
            self._budget.give_back(buf)

    async def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        self._tasks.clear()
        self._release_current()
        if self._upload_id is None and self._creating is not None:
            with contextlib.suppress(Exception):  # a failed create left nothing to abort
                self._upload_id = (await self._creating)["UploadId"]
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            with contextlib.suppress(CheckpointError):
                await self._storage.abort_pending_upload(PendingUpload(self.key, upload_id))


class BufferBody:
    """A request body over a buffer, sent without copying it.

    botocore sees a seekable file-like object (``read``/``seek``/``tell``: it measures
    the length and rewinds it for a retry); aiohttp sees an async iterable and streams
    memoryview slices of the buffer, yielding to the event loop between them (a raw
    ``bytes`` body of many MiB would be copied into the transport in one go).
    """

    _CHUNK = 256 * 1024

    def __init__(self, data: Buffer):
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def __len__(self) -> int:
        return self._view.nbytes - self._pos

    def read(self, n: int | None = -1) -> bytes:
        end = self._view.nbytes if n is None or n < 0 else min(self._view.nbytes, self._pos + n)
        chunk = bytes(self._view[self._pos : end])
        self._pos = end
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._pos, self._view.nbytes)[whence]
        self._pos = max(0, min(self._view.nbytes, base + offset))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True

    async def __aiter__(self) -> AsyncIterator[memoryview]:
        view, pos = self._view, self._pos
        while pos < view.nbytes:
            yield view[pos : pos + self._CHUNK]
            pos += self._CHUNK
            if pos < view.nbytes:
                await asyncio.sleep(0)
