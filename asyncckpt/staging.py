"""From workspaces to encoded blobs, and the background saves of ``save_async``.

One encode path serves both saves: :func:`encode_workspaces` encodes every node's blobs
in place (``save``: zero-copy, the caller must not mutate until the upload ends) or,
given a :class:`StagingBuffers`, copies the arrays into warm buffers first (``save_async``:
afterwards nothing refers to the caller's mutable objects).

:class:`BackgroundSaves` keeps at most one save in flight and makes sure a failure is
seen: by ``await handle``, or else by the next save or ``close``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Mapping
from typing import Any, Literal

import numpy as np

from . import codec
from .codec import EncodedBlob

__all__ = ["BackgroundSaves", "SaveHandle", "StagingBuffers", "encode_workspaces", "shards_size_bound"]

log = logging.getLogger("asyncckpt")

Encoded = dict[str, list[EncodedBlob]]


class StagingBuffers:
    """Per node and blob, an array that receives a copy of the caller's array; kept
    between snapshots so that the second snapshot on copies into warm memory."""

    def __init__(self) -> None:
        self._arrays: dict[str, dict[str, np.ndarray[Any, Any]]] = {}

    def freeze(self, node: str, blobs: Mapping[str, Any]) -> dict[str, Any]:
        """``blobs`` with every array copied into a staging buffer and every mutable
        byte buffer copied into ``bytes``; other values are immutable or are packed into
        new bytes by the encoder. An ndarray subclass is passed on as it is, for the
        encoder to refuse (a copy into a plain array would drop its mask or kind)."""
        stage = self._arrays.setdefault(node, {})
        frozen: dict[str, Any] = {}
        for name, value in blobs.items():
            if codec.is_plain_array(value):
                order: Literal["C", "F"] = "F" if value.flags.f_contiguous and not value.flags.c_contiguous else "C"
                buf = stage.get(name)
                if (
                    buf is None
                    or buf.shape != value.shape
                    or buf.dtype != value.dtype
                    or (order == "F" and not buf.flags.f_contiguous)
                ):
                    buf = np.empty(value.shape, value.dtype, order=order)
                    stage[name] = buf
                np.copyto(buf, value)
                frozen[name] = buf
            elif isinstance(value, (bytearray, memoryview)):
                frozen[name] = bytes(value)
            else:
                frozen[name] = value
        for stale in set(stage) - set(frozen):
            del stage[stale]
        return frozen

    def keep_only(self, nodes: Mapping[str, Any]) -> None:
        for stale in set(self._arrays) - set(nodes):
            del self._arrays[stale]


def encode_workspaces(workspaces: Mapping[str, Mapping[str, Any]], staging: StagingBuffers | None = None) -> Encoded:
    """Validate and encode every node's blobs (a :class:`TypeError` names the first
    unsupported one, before anything is written). With ``staging``, arrays are copied
    into it first. CPU work: run it in a worker thread."""
    encoded: Encoded = {}
    for node, blobs in workspaces.items():
        encoded[node] = codec.encode_blobs(node, staging.freeze(node, blobs) if staging is not None else blobs)
    if staging is not None:
        staging.keep_only(workspaces)
    return encoded


def shards_size_bound(encoded: Encoded, *, fingerprinted: bool = False) -> int:
    """An upper bound of the bytes the shards of ``encoded`` take (their sizes, known
    before any byte is written; ``fingerprinted``: by an incremental save)."""
    return sum(
        codec.shard_size_bound(codec.shard_header(node), blobs, fingerprinted=fingerprinted)
        for node, blobs in encoded.items()
    )


class SaveHandle:
    """The pending commit of ``save_async``.

    ``await handle`` (or ``await handle.wait()``) returns once the epoch is committed
    and raises the save's error otherwise. Cancelling a waiter does not cancel the
    save; :meth:`cancel` does.
    """

    def __init__(self, epoch: int, task: asyncio.Task[None], blocking_seconds: float):
        self.epoch = epoch
        #: how long ``save_async`` held the caller (the snapshot), in seconds
        self.blocking_seconds = blocking_seconds
        self._task = task
        self._seen = False
        self._waiters = 0

    def done(self) -> bool:
        return self._task.done()

    def cancel(self) -> bool:
        """Cancel the background save (the epoch is then not committed)."""
        return self._task.cancel()

    def exception(self) -> BaseException | None:
        """The save's failure once it has ended with one; ``None`` otherwise."""
        if not self._task.done() or self._task.cancelled():
            return None
        return self._task.exception()

    @property
    def awaited(self) -> bool:
        """Somebody is awaiting the handle, or awaited it to its end: a failure reached them."""
        return self._seen or self._waiters > 0

    def mark_seen(self) -> None:
        self._seen = True

    async def settled(self) -> None:
        """Wait until the save ends, without raising its failure."""
        if not self._task.done():
            await asyncio.wait([self._task])

    async def wait(self) -> None:
        self._waiters += 1
        try:
            await asyncio.shield(self._task)
        finally:
            self._waiters -= 1
            if self._task.done():
                self._seen = True

    def __await__(self) -> Any:
        return self.wait().__await__()

    def __repr__(self) -> str:
        state = "done" if self.done() else "in flight"
        return f"<SaveHandle epoch={self.epoch} {state}>"


class BackgroundSaves:
    """At most one background save at a time, warm staging buffers, and failures that
    are never lost."""

    def __init__(self) -> None:
        self._inflight: SaveHandle | None = None
        self._failed: list[SaveHandle] = []
        self._free_staging: list[StagingBuffers] = []

    async def snapshot(self, workspaces: Mapping[str, Mapping[str, Any]]) -> tuple[Encoded, StagingBuffers]:
        """Copy and encode the workspaces into staging buffers (in a worker thread).
        Pass the buffers to :meth:`start`, which takes them back when the save ends."""
        staging = self._free_staging.pop() if self._free_staging else StagingBuffers()
        current = {node: dict(blobs) for node, blobs in workspaces.items()}
        try:
            encoded = await asyncio.to_thread(encode_workspaces, current, staging)
        except BaseException:
            self._free_staging.append(staging)
            raise
        return encoded, staging

    def start(
        self, epoch: int, upload: Coroutine[Any, Any, None], staging: StagingBuffers, blocking_seconds: float
    ) -> SaveHandle:
        """Run ``upload`` in the background; its staging buffers come back when it ends."""
        task = asyncio.create_task(upload)
        handle = SaveHandle(epoch, task, blocking_seconds)
        self._inflight = handle

        def finished(_: asyncio.Task[None]) -> None:
            self._free_staging.append(staging)
            failure = handle.exception()
            if failure is not None:
                self._failed.append(handle)
                if not handle.awaited:
                    log.error("background save of epoch %d failed: %s", epoch, failure)

        task.add_done_callback(finished)
        return handle

    async def drain(self, *, raise_failures: bool = True) -> None:
        """Wait for the save in flight; then raise the first failure nobody has seen."""
        handle, self._inflight = self._inflight, None
        if handle is not None:
            await handle.settled()
        if raise_failures:
            self.raise_unseen()

    def raise_unseen(self) -> None:
        unseen = [h for h in self._failed if not h.awaited]
        self._failed.clear()
        if unseen:
            unseen[0].mark_seen()
            failure = unseen[0].exception()
            assert failure is not None
            raise failure

    def release(self) -> None:
        """Drop the staging buffers (the manager is closing)."""
        self._free_staging.clear()
